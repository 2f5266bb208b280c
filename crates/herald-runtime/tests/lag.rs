//! The consumer-lag gauges: the one-shot `record_lag` and the periodic `lag::Reporter`, on
//! the in-memory broker, under paused time with a test `metrics` recorder.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use herald_core::Event;
use herald_core::broker::{
    Error, GroupName, PartitionLag, Publisher as _, Subscriber, TopicName, partition_for,
};
use herald_core::memory_broker::InMemoryBroker;
use herald_runtime::lag::BuildError;
use herald_runtime::{CONSUMER_LAG, LagOptions, record_lag};
use tokio_util::sync::CancellationToken;

const PARTITIONS: u32 = 2;

/// A `metrics` recorder that keeps the gauges by key, for `metrics::with_local_recorder`.
#[derive(Default)]
struct GaugeRecorder {
    gauges: Mutex<HashMap<String, Arc<AtomicU64>>>,
}

impl GaugeRecorder {
    /// Every gauge as `name{label=value,...}` (labels sorted) → value.
    fn gauges(&self) -> BTreeMap<String, f64> {
        self.gauges
            .lock()
            .unwrap()
            .iter()
            .map(|(key, value)| (key.clone(), f64::from_bits(value.load(Ordering::Relaxed))))
            .collect()
    }
}

impl metrics::Recorder for GaugeRecorder {
    fn describe_counter(
        &self,
        _: metrics::KeyName,
        _: Option<metrics::Unit>,
        _: metrics::SharedString,
    ) {
    }
    fn describe_gauge(
        &self,
        _: metrics::KeyName,
        _: Option<metrics::Unit>,
        _: metrics::SharedString,
    ) {
    }
    fn describe_histogram(
        &self,
        _: metrics::KeyName,
        _: Option<metrics::Unit>,
        _: metrics::SharedString,
    ) {
    }

    fn register_counter(&self, _: &metrics::Key, _: &metrics::Metadata<'_>) -> metrics::Counter {
        metrics::Counter::noop()
    }

    fn register_gauge(&self, key: &metrics::Key, _: &metrics::Metadata<'_>) -> metrics::Gauge {
        let labels: BTreeMap<&str, &str> = key.labels().map(|l| (l.key(), l.value())).collect();
        let labels: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let text = format!("{}{{{}}}", key.name(), labels.join(","));
        let gauge = Arc::clone(self.gauges.lock().unwrap().entry(text).or_default());
        metrics::Gauge::from_arc(gauge)
    }

    fn register_histogram(
        &self,
        _: &metrics::Key,
        _: &metrics::Metadata<'_>,
    ) -> metrics::Histogram {
        metrics::Histogram::noop()
    }
}

/// Runs `future` on a paused current-thread runtime with `recorder` installed.
fn with_recorder<F: Future>(recorder: &GaugeRecorder, future: F) -> F::Output {
    metrics::with_local_recorder(recorder, || {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .unwrap()
            .block_on(future)
    })
}

fn gauge(topic: &str, partition: u32) -> String {
    format!("{CONSUMER_LAG}{{group=billing,partition={partition},topic={topic}}}")
}

fn orders() -> TopicName {
    TopicName::new("orders").unwrap()
}

fn billing() -> GroupName {
    GroupName::new("billing").unwrap()
}

/// `count` events whose keys land in `partition`.
fn events_in(partition: u32, count: usize) -> Vec<Event> {
    (0..)
        .map(|n| format!("key-{n}"))
        .filter(|key| partition_for(key, PARTITIONS) == partition)
        .take(count)
        .map(|key| Event::new("/test", "Tested").with_partition_key(key))
        .collect()
}

fn lags(heads_committed: [(u64, u64); 2]) -> Vec<PartitionLag> {
    heads_committed
        .into_iter()
        .zip(0..)
        .map(|((head, committed), partition)| {
            PartitionLag::new(partition, head, committed).unwrap()
        })
        .collect()
}

#[test]
fn record_lag_sets_one_gauge_per_partition() {
    let recorder = GaugeRecorder::default();
    let broker = InMemoryBroker::new(PARTITIONS);
    let lag = with_recorder(&recorder, async {
        broker.publish(&orders(), events_in(0, 3)).await.unwrap();
        broker.publish(&orders(), events_in(1, 5)).await.unwrap();
        record_lag(&broker, &orders(), &billing()).await.unwrap()
    });
    assert_eq!(lag, lags([(3, 0), (5, 0)]));
    assert_eq!(
        recorder.gauges(),
        BTreeMap::from([(gauge("orders", 0), 3.0), (gauge("orders", 1), 5.0)])
    );
}

#[test]
fn record_lag_of_an_unknown_topic_fails_and_sets_nothing() {
    let recorder = GaugeRecorder::default();
    let broker = InMemoryBroker::new(PARTITIONS);
    let result = with_recorder(&recorder, record_lag(&broker, &orders(), &billing()));
    assert!(
        matches!(&result, Err(Error::UnknownTopic { topic }) if *topic == orders()),
        "{result:?}"
    );
    assert!(recorder.gauges().is_empty());
}

#[test]
fn the_reporter_records_every_interval_until_shutdown() {
    let recorder = GaugeRecorder::default();
    let broker = InMemoryBroker::new(PARTITIONS);
    let subscriber: Arc<dyn Subscriber> = Arc::new(broker.clone());
    with_recorder(&recorder, async {
        broker.publish(&orders(), events_in(0, 4)).await.unwrap();
        broker.publish(&orders(), events_in(1, 2)).await.unwrap();
        let reporter = LagOptions { interval_ms: 1_000 }
            .build(subscriber.clone(), orders(), billing())
            .unwrap();
        let mut handle = reporter.handle();
        assert!(handle.latest().is_none(), "no reading before run");
        let shutdown = CancellationToken::new();
        let started = tokio::time::Instant::now();
        let task = tokio::spawn(reporter.run(shutdown.clone()));

        // The first reading is taken at once.
        let first = handle.reading(1).await.unwrap();
        assert_eq!(first.sequence, 1);
        assert_eq!(first.lag.unwrap(), lags([(4, 0), (2, 0)]));
        assert_eq!(started.elapsed(), Duration::ZERO);
        assert_eq!(recorder.gauges()[&gauge("orders", 0)], 4.0);
        assert_eq!(recorder.gauges()[&gauge("orders", 1)], 2.0);

        // The group consumes and acks partition 0 entirely; the next reading shows it.
        let mut consumer = subscriber.subscribe(&orders(), &billing()).await.unwrap();
        for _ in 0..6 {
            let message = consumer.recv().await.unwrap().unwrap();
            if message.partition == 0 {
                consumer.ack(&message).await.unwrap();
            }
        }
        consumer.close().await.unwrap();
        let second = handle.reading(2).await.unwrap();
        assert_eq!(second.sequence, 2);
        assert_eq!(second.lag.unwrap(), lags([(4, 4), (2, 0)]));
        assert_eq!(started.elapsed(), Duration::from_millis(1_000));
        assert_eq!(recorder.gauges()[&gauge("orders", 0)], 0.0);
        assert_eq!(recorder.gauges()[&gauge("orders", 1)], 2.0);

        let third = handle.reading(3).await.unwrap();
        assert_eq!(started.elapsed(), Duration::from_millis(2_000));
        assert_eq!(third.lag.unwrap(), lags([(4, 4), (2, 0)]));

        shutdown.cancel();
        task.await.unwrap();
        assert!(
            handle.reading(4).await.is_none(),
            "a stopped reporter takes no more readings"
        );
        assert_eq!(handle.latest().unwrap().sequence, 3);
    });
}

#[test]
fn the_reporter_keeps_going_after_a_failed_reading() {
    let recorder = GaugeRecorder::default();
    let broker = InMemoryBroker::new(PARTITIONS);
    with_recorder(&recorder, async {
        let reporter = LagOptions { interval_ms: 500 }
            .build(Arc::new(broker.clone()), orders(), billing())
            .unwrap();
        let mut handle = reporter.handle();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(reporter.run(shutdown.clone()));

        // The topic does not exist yet: the reading fails and no gauge is set.
        let first = handle.reading(1).await.unwrap();
        assert!(
            matches!(
                first.lag.as_ref().map_err(|error| &**error),
                Err(Error::UnknownTopic { .. })
            ),
            "{:?}",
            first.lag
        );
        assert!(recorder.gauges().is_empty());

        broker.publish(&orders(), events_in(1, 7)).await.unwrap();
        let second = handle.reading(2).await.unwrap();
        assert_eq!(second.lag.unwrap(), lags([(0, 0), (7, 0)]));
        assert_eq!(recorder.gauges()[&gauge("orders", 1)], 7.0);
        shutdown.cancel();
        task.await.unwrap();
    });
}

#[test]
fn options_have_defaults_and_bounds() {
    assert_eq!(LagOptions::default().interval_ms, 10_000);
    let parsed: LagOptions = serde_json::from_str(r#"{"interval_ms": 250}"#).unwrap();
    assert_eq!(parsed, LagOptions { interval_ms: 250 });
    assert_eq!(
        serde_json::from_str::<LagOptions>("{}").unwrap(),
        LagOptions::default()
    );
    assert!(serde_json::from_str::<LagOptions>(r#"{"interval": 250}"#).is_err());

    let broker: Arc<dyn Subscriber> = Arc::new(InMemoryBroker::new(PARTITIONS));
    let error = LagOptions { interval_ms: 0 }
        .build(broker, orders(), billing())
        .unwrap_err();
    assert_eq!(
        error,
        BuildError::Bound {
            option: "interval_ms",
            expected: "at least 1"
        }
    );
    assert_eq!(error.to_string(), "`interval_ms` must be at least 1");
}
