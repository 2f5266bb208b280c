//! The Pub/Sub conformance suite on the embedded broker, on a real log in a temporary
//! directory; a restart shuts the broker down, closes the log and opens the same directory
//! again with a new broker.

use std::sync::Arc;

use async_trait::async_trait;
use herald_core::broker::{Publisher, Subscriber, TopicName};
use herald_core::pubsub_conformance::BrokerFixture;
use herald_log::broker::{Broker, BrokerOptions};
use herald_log::{Log, Options};

const PARTITIONS: u32 = 4;

struct Fixture {
    dir: tempfile::TempDir,
    /// The running broker and its log, once started.
    running: Option<(Broker, Log)>,
}

impl Fixture {
    fn new() -> Self {
        Fixture {
            dir: tempfile::tempdir().expect("a temporary directory"),
            running: None,
        }
    }
}

#[async_trait]
impl BrokerFixture for Fixture {
    async fn start(&mut self) -> (Arc<dyn Publisher>, Arc<dyn Subscriber>) {
        if let Some((broker, log)) = self.running.take() {
            broker.shutdown().await;
            log.close().await.expect("the log closes");
        }
        let options = Options::new(self.dir.path());
        let log = tokio::task::spawn_blocking(move || Log::open(options))
            .await
            .expect("the open task")
            .expect("the log opens");
        let mut options = BrokerOptions::new();
        options.partitions_default = PARTITIONS;
        let broker = Broker::new(log.clone(), options);
        self.running = Some((broker.clone(), log));
        (Arc::new(broker.clone()), Arc::new(broker))
    }

    fn partitions(&self) -> u32 {
        PARTITIONS
    }

    async fn create_topic(&mut self, topic: &TopicName) {
        let (broker, _) = self.running.as_ref().expect("started before create_topic");
        let partitions = broker
            .create_topic(topic, PARTITIONS)
            .await
            .expect("the topic is created");
        assert_eq!(partitions, PARTITIONS);
    }
}

herald_core::pubsub_conformance!(|| async { Fixture::new() });
