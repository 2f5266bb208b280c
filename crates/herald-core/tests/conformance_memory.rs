//! The [`EventStore`] conformance suite against [`InMemoryStore`], and proof that the suite
//! catches broken stores.

use herald_core::memory::InMemoryStore;

herald_core::event_store_conformance!(|| async { (InMemoryStore::new(), ()) });

/// Each test wraps the in-memory store in a store with one deliberate fault and checks that
/// the conformance case guarding against that fault panics, while the same case passes on
/// the same wrapper without the fault (so the failure is the fault's, not the wrapper's).
mod the_suite_catches_faults {
    use std::future::Future;
    use std::panic::AssertUnwindSafe;
    use std::sync::Arc;

    use async_trait::async_trait;
    use futures::{FutureExt as _, StreamExt as _};
    use herald_core::conformance;
    use herald_core::memory::InMemoryStore;
    use herald_core::store::{Appended, Error, EventStore, RecordedEvent, Subscription};
    use herald_core::{Direction, Event, ExpectedVersion, Position, StreamName, Version};

    #[derive(Clone, Copy, PartialEq, Eq, Debug)]
    enum Fault {
        None,
        /// `read_all` forward leaves out the last event it would return.
        DropsLastOfReadAll,
        /// `append` ignores the caller's expected version.
        IgnoresExpectedVersion,
        /// `subscribe_all` never delivers the fifth event.
        SubscriptionSkipsOne,
        /// A retried append is answered with `DuplicateEventId` instead of the original.
        ForgetsRetries,
    }

    struct Faulty {
        inner: InMemoryStore,
        fault: Fault,
    }

    #[async_trait]
    impl EventStore for Faulty {
        async fn append(
            &self,
            stream: &StreamName,
            expected: ExpectedVersion,
            events: Vec<Event>,
        ) -> Result<Appended, Error> {
            let expected = match self.fault {
                Fault::IgnoresExpectedVersion => ExpectedVersion::Any,
                _ => expected,
            };
            if self.fault == Fault::ForgetsRetries
                && let Some(first) = events.first()
            {
                let stored = self
                    .inner
                    .read_all(Position::START, Direction::Forward, usize::MAX)
                    .await?
                    .into_iter()
                    .find(|recorded| recorded.event.id == first.id);
                if let Some(stored) = stored {
                    return Err(Error::DuplicateEventId {
                        id: first.id.clone(),
                        stream: stored.stream,
                        version: stored.version,
                    });
                }
            }
            self.inner.append(stream, expected, events).await
        }

        async fn read_stream(
            &self,
            stream: &StreamName,
            from: Version,
            direction: Direction,
            limit: usize,
        ) -> Result<Vec<RecordedEvent>, Error> {
            self.inner.read_stream(stream, from, direction, limit).await
        }

        async fn read_all(
            &self,
            from: Position,
            direction: Direction,
            limit: usize,
        ) -> Result<Vec<RecordedEvent>, Error> {
            let mut events = self.inner.read_all(from, direction, limit).await?;
            if self.fault == Fault::DropsLastOfReadAll && direction == Direction::Forward {
                events.pop();
            }
            Ok(events)
        }

        async fn stream_version(&self, stream: &StreamName) -> Result<Option<Version>, Error> {
            self.inner.stream_version(stream).await
        }

        async fn head(&self) -> Result<Option<Position>, Error> {
            self.inner.head().await
        }

        async fn subscribe_all(&self, from: Position) -> Result<Subscription, Error> {
            let subscription = self.inner.subscribe_all(from).await?;
            if self.fault == Fault::SubscriptionSkipsOne {
                let skipped = subscription
                    .enumerate()
                    .filter(|(index, _)| futures::future::ready(*index != 4))
                    .map(|(_, item)| item);
                return Ok(skipped.boxed());
            }
            Ok(subscription)
        }

        async fn subscribe_stream(
            &self,
            stream: &StreamName,
            from: Version,
        ) -> Result<Subscription, Error> {
            self.inner.subscribe_stream(stream, from).await
        }

        async fn delete_stream(
            &self,
            stream: &StreamName,
            expected: ExpectedVersion,
        ) -> Result<(), Error> {
            self.inner.delete_stream(stream, expected).await
        }
    }

    /// Whether `case` panics against a fresh store with `fault`.
    async fn fails<F, Fut>(fault: Fault, case: F) -> bool
    where
        F: FnOnce(Arc<dyn EventStore>) -> Fut,
        Fut: Future<Output = ()>,
    {
        let store: Arc<dyn EventStore> = Arc::new(Faulty {
            inner: InMemoryStore::new(),
            fault,
        });
        AssertUnwindSafe(case(store)).catch_unwind().await.is_err()
    }

    /// Asserts that `case` passes without faults and fails with `fault`.
    async fn catches<F, Fut>(fault: Fault, case: F)
    where
        F: Fn(Arc<dyn EventStore>) -> Fut,
        Fut: Future<Output = ()>,
    {
        assert!(
            !fails(Fault::None, &case).await,
            "the case must pass on the wrapper without a fault"
        );
        assert!(
            fails(fault, &case).await,
            "the case must fail on a store with the fault {fault:?}"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn a_read_all_that_drops_its_last_event() {
        catches(
            Fault::DropsLastOfReadAll,
            conformance::read_all_forward_and_backward,
        )
        .await;
        catches(
            Fault::DropsLastOfReadAll,
            conformance::concurrent_appends_keep_one_global_order,
        )
        .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn an_append_that_ignores_the_expected_version() {
        catches(
            Fault::IgnoresExpectedVersion,
            conformance::wrong_expected_version_reports_actual,
        )
        .await;
        catches(
            Fault::IgnoresExpectedVersion,
            conformance::failed_append_stores_nothing,
        )
        .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn a_subscription_that_skips_an_event() {
        catches(
            Fault::SubscriptionSkipsOne,
            conformance::subscribe_all_from_start_under_concurrent_writes,
        )
        .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn an_append_that_is_not_idempotent() {
        catches(
            Fault::ForgetsRetries,
            conformance::retried_append_returns_original_result,
        )
        .await;
    }
}
