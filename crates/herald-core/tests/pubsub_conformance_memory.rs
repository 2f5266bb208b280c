//! The Pub/Sub conformance suite against [`InMemoryBroker`], and proof that the suite
//! catches broken brokers.

use std::sync::Arc;

use async_trait::async_trait;
use herald_core::broker::{Publisher, Subscriber};
use herald_core::memory_broker::InMemoryBroker;
use herald_core::pubsub_conformance::BrokerFixture;

/// The partition count of the suite's topics.
const PARTITIONS: u32 = 4;

/// A fresh in-memory broker per `start`: it is not persistent, so the suite skips the
/// restart case and a restart needs no storage.
struct Fixture;

#[async_trait]
impl BrokerFixture for Fixture {
    async fn start(&mut self) -> (Arc<dyn Publisher>, Arc<dyn Subscriber>) {
        let broker = InMemoryBroker::new(PARTITIONS);
        (Arc::new(broker.clone()), Arc::new(broker))
    }

    fn partitions(&self) -> u32 {
        PARTITIONS
    }
}

herald_core::pubsub_conformance!(|| async { Fixture });

/// With a single partition, the consumer-group case cannot check the split but the rest
/// must still hold.
mod one_partition {
    use super::*;

    struct OnePartition;

    #[async_trait]
    impl BrokerFixture for OnePartition {
        async fn start(&mut self) -> (Arc<dyn Publisher>, Arc<dyn Subscriber>) {
            let broker = InMemoryBroker::new(1);
            (Arc::new(broker.clone()), Arc::new(broker))
        }

        fn partitions(&self) -> u32 {
            1
        }
    }

    herald_core::pubsub_conformance!(|| async { OnePartition });
}

/// The in-memory broker is not persistent, so the suite skips its restart case. To prove
/// that the case itself works, a fixture keeps one broker across `start`s (a "restart" that
/// keeps the state) and declares it persistent; its publishers' `close` is a no-op there, so
/// the broker still accepts publishes after the restart.
mod restart_keeping_state {
    use std::sync::Arc;

    use async_trait::async_trait;
    use herald_core::Event;
    use herald_core::broker::{
        Capabilities, Consumer, Error, GroupName, PartitionLag, Published, Publisher, Subscriber,
        TopicName,
    };
    use herald_core::memory_broker::InMemoryBroker;
    use herald_core::pubsub_conformance::{self, BrokerFixture};

    struct Kept(InMemoryBroker);

    #[async_trait]
    impl Publisher for Kept {
        async fn publish(
            &self,
            topic: &TopicName,
            events: Vec<Event>,
        ) -> Result<Vec<Published>, Error> {
            self.0.publish(topic, events).await
        }

        async fn close(&self) -> Result<(), Error> {
            Ok(())
        }
    }

    #[async_trait]
    impl Subscriber for Kept {
        async fn subscribe(
            &self,
            topic: &TopicName,
            group: &GroupName,
        ) -> Result<Box<dyn Consumer>, Error> {
            self.0.subscribe(topic, group).await
        }

        async fn lag(
            &self,
            topic: &TopicName,
            group: &GroupName,
        ) -> Result<Vec<PartitionLag>, Error> {
            self.0.lag(topic, group).await
        }

        fn capabilities(&self) -> Capabilities {
            Capabilities {
                persistent: true,
                ..self.0.capabilities()
            }
        }
    }

    struct KeptFixture {
        broker: InMemoryBroker,
        starts: usize,
    }

    #[async_trait]
    impl BrokerFixture for KeptFixture {
        async fn start(&mut self) -> (Arc<dyn Publisher>, Arc<dyn Subscriber>) {
            self.starts += 1;
            (
                Arc::new(Kept(self.broker.clone())),
                Arc::new(Kept(self.broker.clone())),
            )
        }

        fn partitions(&self) -> u32 {
            self.broker.partitions()
        }
    }

    impl Drop for KeptFixture {
        fn drop(&mut self) {
            // Fails the test (a panic in the case's drop) if the case never restarted.
            if !std::thread::panicking() {
                assert_eq!(self.starts, 2, "the restart case starts the broker twice");
            }
        }
    }

    #[test]
    fn group_resumes_after_restart() {
        pubsub_conformance::run(
            || async {
                KeptFixture {
                    broker: InMemoryBroker::new(4),
                    starts: 0,
                }
            },
            pubsub_conformance::group_resumes_after_restart,
        );
    }
}

/// Each test wraps the in-memory broker in one with a deliberate fault and checks that the
/// case guarding against that fault panics, while the same case passes on the same wrapper
/// without the fault (so the failure is the fault's, not the wrapper's).
mod the_suite_catches_faults {
    use std::future::Future;
    use std::panic::AssertUnwindSafe;
    use std::sync::Arc;

    use async_trait::async_trait;
    use futures::FutureExt as _;
    use herald_core::Event;
    use herald_core::broker::{
        Capabilities, Consumer, Error, GroupName, Message, PartitionLag, Published, Publisher,
        Subscriber, TopicName,
    };
    use herald_core::memory_broker::InMemoryBroker;
    use herald_core::pubsub_conformance::{self, BrokerFixture};

    #[derive(Clone, Copy, PartialEq, Eq, Debug)]
    enum Fault {
        None,
        /// Every consumer acks its third message behind the caller's back and skips it.
        ConsumerSkipsOne,
        /// `nack` acks the message instead.
        NackAcks,
        /// Publish reports offsets one too high.
        OffsetsOffByOne,
        /// Lag reports nothing committed.
        LagForgetsCommits,
        /// `recv` yields to the runtime between taking a message and returning it, so a
        /// `recv` dropped at that point loses the message.
        RecvNotCancelSafe,
    }

    #[derive(Clone)]
    struct Faulty {
        inner: InMemoryBroker,
        fault: Fault,
    }

    struct FaultyConsumer {
        inner: Option<Box<dyn Consumer>>,
        fault: Fault,
        received: usize,
    }

    #[async_trait]
    impl Publisher for Faulty {
        async fn publish(
            &self,
            topic: &TopicName,
            events: Vec<Event>,
        ) -> Result<Vec<Published>, Error> {
            let mut published = self.inner.publish(topic, events).await?;
            if self.fault == Fault::OffsetsOffByOne {
                for at in &mut published {
                    at.offset += 1;
                }
            }
            Ok(published)
        }

        async fn close(&self) -> Result<(), Error> {
            Publisher::close(&self.inner).await
        }
    }

    #[async_trait]
    impl Subscriber for Faulty {
        async fn subscribe(
            &self,
            topic: &TopicName,
            group: &GroupName,
        ) -> Result<Box<dyn Consumer>, Error> {
            let inner = self.inner.subscribe(topic, group).await?;
            Ok(Box::new(FaultyConsumer {
                inner: Some(inner),
                fault: self.fault,
                received: 0,
            }))
        }

        async fn lag(
            &self,
            topic: &TopicName,
            group: &GroupName,
        ) -> Result<Vec<PartitionLag>, Error> {
            let mut lag = self.inner.lag(topic, group).await?;
            if self.fault == Fault::LagForgetsCommits {
                for partition in &mut lag {
                    *partition = PartitionLag::new(partition.partition, partition.head, 0)
                        .expect("0 is never beyond the head");
                }
            }
            Ok(lag)
        }

        fn capabilities(&self) -> Capabilities {
            self.inner.capabilities()
        }
    }

    impl FaultyConsumer {
        fn inner(&mut self) -> &mut dyn Consumer {
            &mut **self
                .inner
                .as_mut()
                .expect("the inner consumer lives until close")
        }
    }

    #[async_trait]
    impl Consumer for FaultyConsumer {
        async fn recv(&mut self) -> Option<Result<Message, Error>> {
            loop {
                let message = match self.inner().recv().await? {
                    Ok(message) => message,
                    Err(error) => return Some(Err(error)),
                };
                self.received += 1;
                if self.fault == Fault::ConsumerSkipsOne && self.received == 3 {
                    if let Err(error) = self.inner().ack(&message).await {
                        return Some(Err(error));
                    }
                    continue;
                }
                if self.fault == Fault::RecvNotCancelSafe {
                    tokio::task::yield_now().await;
                }
                return Some(Ok(message));
            }
        }

        async fn ack(&mut self, message: &Message) -> Result<(), Error> {
            self.inner().ack(message).await
        }

        async fn nack(&mut self, message: &Message) -> Result<(), Error> {
            if self.fault == Fault::NackAcks {
                return self.inner().ack(message).await;
            }
            self.inner().nack(message).await
        }

        async fn close(mut self: Box<Self>) -> Result<(), Error> {
            let inner = self.inner.take().expect("close is called once");
            inner.close().await
        }
    }

    struct FaultyFixture(Fault);

    #[async_trait]
    impl BrokerFixture for FaultyFixture {
        async fn start(&mut self) -> (Arc<dyn Publisher>, Arc<dyn Subscriber>) {
            let broker = Faulty {
                inner: InMemoryBroker::new(4),
                fault: self.0,
            };
            (Arc::new(broker.clone()), Arc::new(broker))
        }

        fn partitions(&self) -> u32 {
            4
        }
    }

    /// Whether `case` panics against a fresh broker with `fault`.
    async fn fails<F, Fut>(fault: Fault, case: F) -> bool
    where
        F: FnOnce(Box<dyn BrokerFixture>) -> Fut,
        Fut: Future<Output = ()>,
    {
        let fixture: Box<dyn BrokerFixture> = Box::new(FaultyFixture(fault));
        AssertUnwindSafe(case(fixture))
            .catch_unwind()
            .await
            .is_err()
    }

    /// Asserts that `case` passes without faults and fails with `fault`.
    async fn catches<F, Fut>(fault: Fault, case: F)
    where
        F: Fn(Box<dyn BrokerFixture>) -> Fut,
        Fut: Future<Output = ()>,
    {
        assert!(
            !fails(Fault::None, &case).await,
            "the case must pass on the wrapper without a fault"
        );
        assert!(
            fails(fault, &case).await,
            "the case must fail on a broker with the fault {fault:?}"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn a_consumer_that_skips_a_message() {
        catches(
            Fault::ConsumerSkipsOne,
            pubsub_conformance::one_consumer_receives_everything_once,
        )
        .await;
        catches(
            Fault::ConsumerSkipsOne,
            pubsub_conformance::order_per_key_under_concurrent_publishers,
        )
        .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn a_lag_that_forgets_commits() {
        catches(
            Fault::LagForgetsCommits,
            pubsub_conformance::lag_counts_what_the_group_has_not_committed,
        )
        .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn a_recv_that_is_not_cancel_safe() {
        catches(
            Fault::RecvNotCancelSafe,
            pubsub_conformance::recv_is_cancel_safe,
        )
        .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn a_nack_that_acks() {
        catches(
            Fault::NackAcks,
            pubsub_conformance::nack_redelivers_the_rest_of_the_partition,
        )
        .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn a_publish_that_reports_wrong_offsets() {
        catches(
            Fault::OffsetsOffByOne,
            pubsub_conformance::publish_assigns_partitions_and_offsets,
        )
        .await;
        catches(
            Fault::OffsetsOffByOne,
            pubsub_conformance::one_consumer_receives_everything_once,
        )
        .await;
    }
}
