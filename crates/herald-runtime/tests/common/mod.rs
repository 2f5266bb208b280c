//! Fixtures shared by the runtime's tests.
#![allow(dead_code, unreachable_pub)]

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};

use chrono::{DateTime, TimeZone, Utc};
use herald_core::Event;
use herald_core::broker::{GroupName, Message, TopicName};
use herald_runtime::{Clock, Delivery, TokioClock};
use tokio_util::sync::CancellationToken;

pub const GROUP: &str = "billing";
pub const TOPIC: &str = "orders";
pub const PARTITION: u32 = 3;
pub const OFFSET: u64 = 42;

pub fn order_placed() -> Event {
    Event::new("/orders", "OrderPlaced")
        .with_id("evt-1")
        .with_correlation_id("order-7")
        .with_causation_id("cmd-0")
        .with_traceparent("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
        .with_data(serde_json::json!({ "order_id": "order-7", "total_cents": 1250 }))
}

pub fn message(event: Event) -> Message {
    Message {
        topic: TopicName::new(TOPIC).unwrap(),
        partition: PARTITION,
        offset: OFFSET,
        attempt: 1,
        event,
    }
}

pub fn delivery(event: Event) -> Delivery {
    Delivery::new(
        message(event),
        GroupName::new(GROUP).unwrap(),
        CancellationToken::new(),
    )
}

/// The wall-clock time the test clock starts at.
pub fn epoch() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 1, 2, 3, 4, 5).unwrap()
}

pub fn clock() -> Arc<dyn Clock> {
    Arc::new(TokioClock::starting_at(epoch()))
}

/// Records the tokio time of every call, to read the retry schedule back.
#[derive(Clone, Default)]
pub struct Calls(Arc<Mutex<Vec<tokio::time::Instant>>>);

impl Calls {
    pub fn record(&self) -> usize {
        let mut calls = self.0.lock().unwrap();
        calls.push(tokio::time::Instant::now());
        calls.len()
    }

    pub fn count(&self) -> usize {
        self.0.lock().unwrap().len()
    }

    pub fn times(&self) -> Vec<tokio::time::Instant> {
        self.0.lock().unwrap().clone()
    }

    /// The waits between consecutive calls, in milliseconds.
    pub fn gaps_ms(&self) -> Vec<u64> {
        self.times()
            .windows(2)
            .map(|pair| (pair[1] - pair[0]).as_millis() as u64)
            .collect()
    }
}

/// A `metrics` recorder that keeps counters and histogram samples by key, for
/// `metrics::with_local_recorder`.
#[derive(Default)]
pub struct TestRecorder {
    counters: Mutex<HashMap<String, Arc<AtomicU64>>>,
    histograms: Mutex<HashMap<String, Arc<Samples>>>,
}

#[derive(Default)]
pub struct Samples(Mutex<Vec<f64>>);

impl metrics::HistogramFn for Samples {
    fn record(&self, value: f64) {
        self.0.lock().unwrap().push(value);
    }
}

/// `name{label=value,...}` with labels sorted.
fn key_text(key: &metrics::Key) -> String {
    let labels: BTreeMap<&str, &str> = key.labels().map(|l| (l.key(), l.value())).collect();
    let labels: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
    format!("{}{{{}}}", key.name(), labels.join(","))
}

impl TestRecorder {
    pub fn counter(&self, key: &str) -> u64 {
        self.counters
            .lock()
            .unwrap()
            .get(key)
            .map_or(0, |c| c.load(std::sync::atomic::Ordering::Relaxed))
    }

    pub fn counter_keys(&self) -> Vec<String> {
        let mut keys: Vec<String> = self.counters.lock().unwrap().keys().cloned().collect();
        keys.sort();
        keys
    }

    pub fn samples(&self, key: &str) -> Vec<f64> {
        self.histograms
            .lock()
            .unwrap()
            .get(key)
            .map_or_else(Vec::new, |s| s.0.lock().unwrap().clone())
    }
}

impl metrics::Recorder for TestRecorder {
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

    fn register_counter(&self, key: &metrics::Key, _: &metrics::Metadata<'_>) -> metrics::Counter {
        let counter = Arc::clone(
            self.counters
                .lock()
                .unwrap()
                .entry(key_text(key))
                .or_default(),
        );
        metrics::Counter::from_arc(counter)
    }

    fn register_gauge(&self, _: &metrics::Key, _: &metrics::Metadata<'_>) -> metrics::Gauge {
        metrics::Gauge::noop()
    }

    fn register_histogram(
        &self,
        key: &metrics::Key,
        _: &metrics::Metadata<'_>,
    ) -> metrics::Histogram {
        let samples = Arc::clone(
            self.histograms
                .lock()
                .unwrap()
                .entry(key_text(key))
                .or_default(),
        );
        metrics::Histogram::from_arc(samples)
    }
}

/// Runs `future` on a paused current-thread runtime with `recorder` installed.
pub fn with_recorder<F: std::future::Future>(recorder: &TestRecorder, future: F) -> F::Output {
    metrics::with_local_recorder(recorder, || {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .unwrap()
            .block_on(future)
    })
}

/// A captured span: its name and its fields, as text.
#[derive(Debug, Clone)]
pub struct CapturedSpan {
    pub name: &'static str,
    pub fields: BTreeMap<String, String>,
}

/// The capture behind the test binary's global subscriber, installed on first use.
///
/// Global rather than per-thread (`set_default`): tracing caches whether a callsite is
/// enabled, and a test thread without a subscriber hitting the span first can make a
/// thread-scoped subscriber miss it. Every test that goes through the trace layer calls
/// this first, and tests tell their spans apart by event id.
pub fn spans() -> &'static SpanCapture {
    static CAPTURE: std::sync::OnceLock<SpanCapture> = std::sync::OnceLock::new();
    CAPTURE.get_or_init(|| {
        use tracing_subscriber::layer::SubscriberExt as _;
        let capture = SpanCapture::default();
        let subscriber = tracing_subscriber::registry().with(capture.clone());
        tracing::subscriber::set_global_default(subscriber).unwrap();
        capture
    })
}

/// A tracing layer that keeps every span with its fields.
#[derive(Clone, Default)]
pub struct SpanCapture(Arc<Mutex<Vec<(tracing::span::Id, CapturedSpan)>>>);

struct FieldVisitor<'a>(&'a mut BTreeMap<String, String>);

impl tracing::field::Visit for FieldVisitor<'_> {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        self.0.insert(field.name().to_owned(), format!("{value:?}"));
    }

    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        self.0.insert(field.name().to_owned(), value.to_owned());
    }
}

impl SpanCapture {
    pub fn spans(&self) -> Vec<CapturedSpan> {
        self.0
            .lock()
            .unwrap()
            .iter()
            .map(|(_, s)| s.clone())
            .collect()
    }

    pub fn named(&self, name: &str) -> Vec<CapturedSpan> {
        self.spans()
            .into_iter()
            .filter(|s| s.name == name)
            .collect()
    }

    /// The delivery spans of the event with id `event_id`.
    pub fn deliveries_of(&self, event_id: &str) -> Vec<CapturedSpan> {
        self.named(herald_runtime::SPAN_NAME)
            .into_iter()
            .filter(|span| span.fields.get("event.id").map(String::as_str) == Some(event_id))
            .collect()
    }
}

impl<S> tracing_subscriber::Layer<S> for SpanCapture
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    fn on_new_span(
        &self,
        attrs: &tracing::span::Attributes<'_>,
        id: &tracing::span::Id,
        _ctx: tracing_subscriber::layer::Context<'_, S>,
    ) {
        let mut fields = BTreeMap::new();
        attrs.record(&mut FieldVisitor(&mut fields));
        let span = CapturedSpan {
            name: attrs.metadata().name(),
            fields,
        };
        self.0.lock().unwrap().push((id.clone(), span));
    }

    fn on_record(
        &self,
        id: &tracing::span::Id,
        values: &tracing::span::Record<'_>,
        _ctx: tracing_subscriber::layer::Context<'_, S>,
    ) {
        let mut spans = self.0.lock().unwrap();
        if let Some((_, span)) = spans.iter_mut().rev().find(|(i, _)| i == id) {
            values.record(&mut FieldVisitor(&mut span.fields));
        }
    }
}
