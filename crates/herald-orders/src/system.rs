//! The whole order system in one process: [`SystemOptions`] → [`SystemOptions::build`] →
//! [`System::run`], with a cheap [`SystemHandle`] for the API, the tests and the tools.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures::{FutureExt as _, StreamExt as _};
use herald_core::broker::{GroupName, Message, Subscriber as _, TopicName};
use herald_core::{EventStore as _, Position};
use herald_log::Log;
use herald_log::broker::{Broker, BrokerOptions};
use herald_runtime::consumer::{self, Handle as ConsumerHandle, Replay};
use herald_runtime::dead_letter_store::StoreError;
use herald_runtime::{
    ConsumerOptions, ConsumerService, DeadLetter, DeadLetterStore, Delivery, EventStoreDeadLetters,
    HandlerError, OnDeadLetter, Outcome, PipelineOptions, Router, SystemClock,
};
use herald_sql::relay::{self, OnPublish, Relay};
use herald_sql::{Outbox, RelayOptions};
use rand::SeedableRng as _;
use rand::rngs::StdRng;
use serde::{Deserialize, Serialize};
use sqlx::Sqlite;
use tokio::task::{JoinHandle, JoinSet};
use tokio_util::sync::{CancellationToken, DropGuard};
use tower::ServiceExt as _;
use tracing::Instrument as _;

use crate::db::{self, Db, DbOptions, Migrations, Writer};
use crate::events::Service;
use crate::invariants::{self, CheckError, InvariantReport};
use crate::services::analytics::{
    self, AnalyticsService, AnalyticsView, Projection, ProjectionOptions, RebuildError,
};
use crate::services::audit::{self, AuditEntry, AuditService};
use crate::services::inventory::{self, InventoryService, ProductView};
use crate::services::notification::{self, Email, NotificationService};
use crate::services::order;
use crate::services::order::{
    InvalidField, OrderRequest, OrderService, OrderView, Placed, WaitError,
};
use crate::services::payment::{self, Gateway, InvalidRate, PaymentService};
use crate::services::shipping::{self, ShippingService};

/// The topic of the flow, unless [`SystemOptions::topic`] names another.
pub const TOPIC_DEFAULT: &str = "orders";
/// The directory, inside the data directory, of the services' databases
/// (`<service>.sqlite`).
pub const SERVICES_DIR: &str = "services";
/// The most dead letters [`SystemHandle::dead_letters`] returns.
pub const DEAD_LETTERS_LEN_MAX: usize = 1_000;

/// How the order system is built. Every bound is named with its unit last.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SystemOptions {
    /// The data directory: the services' databases go in `<data_dir>/services/`. Usually
    /// the embedded log's directory.
    pub data_dir: PathBuf,
    /// The topic every event of the flow goes to.
    pub topic: String,
    /// The topic's partitions, when the system creates it.
    pub partitions: u32,
    /// Seeds the payment gateway's draws and the retry jitter.
    pub seed: u64,
    /// The share of charges the gateway declines at random (0 to 1).
    pub fail_payment_rate: f64,
    /// The share of gateway calls that fail with a transient error (0 to 1).
    pub transient_error_rate: f64,
    /// Each consumer's handler stack: timeout and retries.
    pub pipeline: PipelineOptions,
    /// Each consumer's bounds. `publish_topic` must be unset: services publish through
    /// their outbox.
    pub consumer: ConsumerOptions,
    /// Each outbox relay's bounds; `name` is set to the service's.
    pub relay: RelayOptions,
    /// Each service database's bounds.
    pub db: DbOptions,
    /// The most log events the analytics projection applies in one transaction.
    pub projection_batch_len_max: usize,
    /// How long the analytics projection waits before resubscribing after a failure.
    pub projection_retry_delay_ms: u64,
    /// How long the services keep what only guards against repeats.
    pub retention: RetentionOptions,
}

/// How long the services keep what only guards against repeats, and how often they delete
/// what expired ([`SystemHandle::prune`]). Every bound is named with its unit last.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetentionOptions {
    /// How long a service keeps the inbox record of an event it handled: a redelivery
    /// within this time changes nothing. Deliveries are acked within seconds of their
    /// handling, so days leave a wide margin.
    pub inbox_ms: u64,
    /// How long the order service keeps an `Idempotency-Key`: a retry with the key within
    /// this time gets the same order.
    pub idempotency_key_ms: u64,
    /// How often the expired records are deleted.
    pub interval_ms: u64,
}

impl Default for RetentionOptions {
    fn default() -> Self {
        RetentionOptions {
            inbox_ms: 7 * 24 * 3_600_000,
            idempotency_key_ms: 24 * 3_600_000,
            interval_ms: 60_000,
        }
    }
}

/// What [`SystemHandle::prune`] deleted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct Pruned {
    /// Inbox records, over every service.
    pub inbox: u64,
    /// Idempotency keys of the order service.
    pub idempotency_keys: u64,
}

/// The most records one prune statement deletes: the write connection is held that long.
const PRUNE_LEN_MAX: u32 = 1_000;

impl Default for SystemOptions {
    fn default() -> Self {
        SystemOptions {
            data_dir: PathBuf::from("herald-data"),
            topic: TOPIC_DEFAULT.to_owned(),
            partitions: 8,
            seed: 42,
            fail_payment_rate: 0.0,
            transient_error_rate: 0.0,
            pipeline: PipelineOptions::default(),
            consumer: ConsumerOptions {
                // A dead-lettered event holds back its order's later events until it is
                // replayed or discarded: the flow of one order stays in causal order.
                on_dead_letter: OnDeadLetter::ParkKey,
                ..ConsumerOptions::default()
            },
            relay: RelayOptions {
                on_publish: OnPublish::Delete,
                // One relay per database, in the one process that holds the data
                // directory (the embedded log's lock): a relay starting there is alone, so
                // it takes over at once the leases a crashed predecessor left.
                take_over_on_start: true,
                lease_ttl_ms: 3_000,
                publish_timeout_ms: 2_000,
                ..RelayOptions::default()
            },
            db: DbOptions::default(),
            projection_batch_len_max: 512,
            projection_retry_delay_ms: 1_000,
            retention: RetentionOptions::default(),
        }
    }
}

/// Why the system could not be built.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BuildError {
    /// An option is out of its range.
    #[error("invalid option `{option}`: {reason}")]
    Option {
        /// The option.
        option: &'static str,
        /// Why.
        reason: String,
    },
    /// The services' directory could not be created.
    #[error("cannot create {}", path.display())]
    Io {
        /// The directory.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// A service's database could not be opened, migrated or seeded.
    #[error("cannot open the database of the {service} service")]
    Db {
        /// The service.
        service: Service,
        /// The error.
        #[source]
        source: db::Error,
    },
    /// The topic could not be created.
    #[error("cannot create the topic")]
    Topic(#[source] herald_core::broker::Error),
    /// A consumer could not be built.
    #[error("cannot build the consumer of the {service} service")]
    Consumer {
        /// The service.
        service: Service,
        /// The error.
        #[source]
        source: consumer::BuildError,
    },
    /// A relay could not be built.
    #[error("cannot build the outbox relay of the {service} service")]
    Relay {
        /// The service.
        service: Service,
        /// The error.
        #[source]
        source: herald_sql::Error,
    },
}

/// Why the system stopped with an error. It was shut down in order all the same.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RunError {
    /// A consumer stopped with an error (it had left its group).
    #[error("the consumer of the {service} service failed")]
    Consumer {
        /// The service.
        service: Service,
        /// The error.
        #[source]
        source: consumer::Error,
    },
    /// A relay stopped with an error.
    #[error("the outbox relay of the {service} service failed")]
    Relay {
        /// The service.
        service: Service,
        /// The error.
        #[source]
        source: herald_sql::Error,
    },
    /// A component stopped before it was asked to (e.g. the broker shut down under it).
    #[error("the {component} stopped unexpectedly")]
    Stopped {
        /// What stopped.
        component: String,
    },
    /// A task panicked: a bug.
    #[error("the {component} panicked")]
    Panicked {
        /// What panicked.
        component: String,
    },
}

/// What the system did, returned when it stops.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RunReport {
    /// Each consumer's report.
    pub consumers: BTreeMap<Service, consumer::Report>,
    /// Each relay's report.
    pub relays: BTreeMap<Service, relay::Report>,
}

/// Why placing an order failed; nothing was stored.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PlaceError {
    /// The order is not acceptable.
    #[error("invalid order: {}", .0.iter().map(|fault| format!("{} {}", fault.pointer, fault.reason)).collect::<Vec<_>>().join("; "))]
    Invalid(Vec<InvalidField>),
    /// The idempotency key was used before with another order.
    #[error("the idempotency key was used before with another order ({order_id})")]
    KeyReused {
        /// The order of the first use.
        order_id: String,
    },
    /// The order service's database failed.
    #[error("storing the order failed")]
    State(#[source] db::Error),
}

/// Why [`SystemHandle::wait_idle`] returned without the system being idle.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IdleError {
    /// The timeout elapsed first.
    #[error("the system was still busy after {timeout_ms} ms: {busy}")]
    TimedOut {
        /// The timeout.
        timeout_ms: u64,
        /// What was still busy at the last look.
        busy: String,
    },
    /// Reading the log, a lag or an outbox failed.
    #[error("checking whether the system is idle failed: {0}")]
    Check(String),
    /// The waits were ended ([`SystemHandle::end_waits`]): the system is stopping.
    #[error("the order system is stopping")]
    Stopping,
}

/// The order system, built and ready to [`run`](System::run).
pub struct System {
    handle: SystemHandle,
    consumers: Vec<(Service, ConsumerService)>,
    relays: Vec<(Service, Relay<Sqlite>)>,
    projection: Projection,
    writers: Vec<JoinHandle<()>>,
    /// Stops the database writers if the system is dropped without running.
    writers_stop: DropGuard,
}

/// Talks to the order system: the API, waits, checks and switches. Cheap to clone.
#[derive(Clone)]
pub struct SystemHandle {
    shared: Arc<Shared>,
}

struct Shared {
    data_dir: PathBuf,
    topic: TopicName,
    log: Log,
    broker: Broker,
    gateway: Arc<Gateway>,
    order: Arc<OrderService>,
    payment: Arc<PaymentService>,
    inventory: Arc<InventoryService>,
    shipping: Arc<ShippingService>,
    notification: Arc<NotificationService>,
    audit: Arc<AuditService>,
    analytics: Arc<AnalyticsService>,
    dead_letters: Arc<EventStoreDeadLetters>,
    consumers: BTreeMap<Service, (GroupName, ConsumerHandle, Router)>,
    /// Bounds the `GET /api/idle` requests waiting at once.
    idle_waiters: tokio::sync::Semaphore,
    /// Once cancelled, every wait ends at once ([`SystemHandle::end_waits`]).
    waits_end: CancellationToken,
    retention: RetentionOptions,
}

impl SystemOptions {
    fn check(&self) -> Result<TopicName, BuildError> {
        let invalid = |option: &'static str, reason: String| BuildError::Option { option, reason };
        let topic =
            TopicName::new(&self.topic).map_err(|error| invalid("topic", error.to_string()))?;
        if self.partitions == 0 {
            return Err(invalid("partitions", "must be at least 1".to_owned()));
        }
        for (option, rate) in [
            ("fail_payment_rate", self.fail_payment_rate),
            ("transient_error_rate", self.transient_error_rate),
        ] {
            if !(0.0..=1.0).contains(&rate) {
                return Err(invalid(option, InvalidRate(rate).to_string()));
            }
        }
        if self.consumer.publish_topic.is_some() {
            return Err(invalid(
                "consumer.publish_topic",
                "must be unset: services publish through their outbox".to_owned(),
            ));
        }
        if self.retention.interval_ms == 0 {
            return Err(invalid(
                "retention.interval_ms",
                "must be at least 1".to_owned(),
            ));
        }
        if self.projection_batch_len_max == 0 {
            return Err(invalid(
                "projection_batch_len_max",
                "must be at least 1".to_owned(),
            ));
        }
        Ok(topic)
    }

    /// Builds the system on `log`: creates the topic, opens (creating, migrating and
    /// seeding) each service's database under `<data_dir>/services/`, and starts their
    /// database writers, so that [`SystemHandle::place`] works at once; the consumers,
    /// relays and projection start with [`System::run`]. A system dropped without running
    /// stops its writers.
    ///
    /// The system makes the one [`Broker`] of `log` ([`SystemHandle::broker`]): there must
    /// be no other on the same log. The log stays the caller's: close it after `run`.
    pub async fn build(self, log: Log) -> Result<System, BuildError> {
        let topic = self.check()?;
        let services_dir = self.data_dir.join(SERVICES_DIR);
        tokio::fs::create_dir_all(&services_dir)
            .await
            .map_err(|source| BuildError::Io {
                path: services_dir.clone(),
                source,
            })?;
        let broker = Broker::new(
            log.clone(),
            BrokerOptions {
                partitions_default: self.partitions,
                ..BrokerOptions::new()
            },
        );
        broker
            .create_topic(&topic, self.partitions)
            .await
            .map_err(BuildError::Topic)?;

        let writers_stop = CancellationToken::new();
        // Stops the writers already started if the build fails half-way, or if the system
        // is dropped without running.
        let stop_on_drop = writers_stop.clone().drop_guard();
        let mut writers = Vec::new();
        let mut relays = Vec::new();
        let open = async |service: Service, migrations: Migrations| {
            let path = services_dir.join(format!("{service}.sqlite"));
            Db::open(&path, service.as_str(), &self.db, migrations)
                .await
                .map_err(|source| BuildError::Db { service, source })
        };
        let mut start = |service: Service, (db, writer): (Db, Writer), emits: bool| {
            let relay_handle = if emits {
                let relay = RelayOptions {
                    name: Some(service.as_str().to_owned()),
                    ..self.relay.clone()
                }
                .build(db.writes().clone(), Arc::new(broker.clone()))
                .map_err(|source| BuildError::Relay { service, source })?;
                let handle = relay.handle();
                relays.push((service, relay));
                Some(handle)
            } else {
                None
            };
            writers.push(writer.spawn(relay_handle, writers_stop.clone()));
            Ok::<_, BuildError>(db)
        };
        let order_db = start(
            Service::Order,
            open(Service::Order, order::MIGRATIONS).await?,
            true,
        )?;
        let payment_db = start(
            Service::Payment,
            open(Service::Payment, payment::MIGRATIONS).await?,
            true,
        )?;
        let inventory_db = start(
            Service::Inventory,
            open(Service::Inventory, inventory::MIGRATIONS).await?,
            true,
        )?;
        let shipping_db = start(
            Service::Shipping,
            open(Service::Shipping, shipping::MIGRATIONS).await?,
            true,
        )?;
        let notification_db = start(
            Service::Notification,
            open(Service::Notification, notification::MIGRATIONS).await?,
            false,
        )?;
        let audit_db = start(
            Service::Audit,
            open(Service::Audit, audit::MIGRATIONS).await?,
            false,
        )?;
        let analytics_db = start(
            Service::Analytics,
            open(Service::Analytics, analytics::MIGRATIONS).await?,
            false,
        )?;
        let seeded = |service: Service| move |source| BuildError::Db { service, source };
        payment::seed(&payment_db)
            .await
            .map_err(seeded(Service::Payment))?;
        inventory::seed(&inventory_db)
            .await
            .map_err(seeded(Service::Inventory))?;
        notification::seed(&notification_db)
            .await
            .map_err(seeded(Service::Notification))?;

        let group = |service: Service| {
            GroupName::new(service.as_str()).expect("service names are valid group names")
        };
        let outbox = Outbox::new(topic.clone());
        let gateway = Arc::new(
            Gateway::new(self.seed, self.fail_payment_rate, self.transient_error_rate)
                .expect("rates checked above"),
        );
        let waits_end = CancellationToken::new();
        let order = OrderService::new(
            order_db,
            outbox.clone(),
            group(Service::Order),
            waits_end.clone(),
        );
        let payment = PaymentService::new(
            payment_db,
            outbox.clone(),
            group(Service::Payment),
            Arc::clone(&gateway),
        );
        let inventory =
            InventoryService::new(inventory_db, outbox.clone(), group(Service::Inventory));
        let shipping = ShippingService::new(shipping_db, outbox, group(Service::Shipping));
        let notification = NotificationService::new(notification_db);
        let audit = AuditService::new(audit_db);
        let (analytics, projection) = AnalyticsService::new(
            analytics_db,
            log.clone(),
            topic.as_str(),
            ProjectionOptions {
                batch_len_max: self.projection_batch_len_max,
                retry_delay_ms: self.projection_retry_delay_ms,
            },
        );

        let dead_letters = Arc::new(EventStoreDeadLetters::new(Arc::new(log.clone())));
        let routers = [
            (Service::Order, order.router()),
            (Service::Payment, payment.router()),
            (Service::Inventory, inventory.router()),
            (Service::Shipping, shipping.router()),
            (Service::Notification, notification.router()),
            (Service::Audit, audit.router()),
        ];
        let mut consumers = Vec::new();
        let mut handles = BTreeMap::new();
        for (index, (service, router)) in routers.into_iter().enumerate() {
            let pipeline = self.pipeline.build(
                router.clone(),
                StdRng::seed_from_u64(self.seed.wrapping_add(index as u64 + 1)),
                Arc::new(SystemClock),
            );
            let consumer = self
                .consumer
                .clone()
                .build(
                    Arc::new(broker.clone()),
                    Arc::new(broker.clone()),
                    Arc::clone(&dead_letters) as Arc<dyn DeadLetterStore>,
                    topic.clone(),
                    group(service),
                    pipeline,
                )
                .map_err(|source| BuildError::Consumer { service, source })?
                // Most events of the topic are for other services.
                .skip_other_types(router.types());
            handles.insert(service, (group(service), consumer.handle(), router));
            consumers.push((service, consumer));
        }
        Ok(System {
            handle: SystemHandle {
                shared: Arc::new(Shared {
                    data_dir: self.data_dir,
                    topic,
                    log,
                    broker,
                    gateway,
                    order,
                    payment,
                    inventory,
                    shipping,
                    notification,
                    audit,
                    analytics,
                    dead_letters,
                    consumers: handles,
                    idle_waiters: tokio::sync::Semaphore::new(crate::api::IDLE_WAITERS_MAX),
                    waits_end,
                    retention: self.retention,
                }),
            },
            consumers,
            relays,
            projection,
            writers,
            writers_stop: stop_on_drop,
        })
    }
}

/// A finished task: which, and how it ended.
enum Finished {
    Consumer(Service, Result<consumer::Report, consumer::Error>),
    Relay(Service, Result<relay::Report, herald_sql::Error>),
}

impl System {
    /// A handle to the system.
    pub fn handle(&self) -> SystemHandle {
        self.handle.clone()
    }

    /// The `/api/*` routes (see [`crate::api`]), to merge into a server's router.
    pub fn api_router(&self) -> axum::Router {
        self.handle.api_router()
    }

    /// Runs the consumers, relays and the analytics projection until `shutdown` is
    /// cancelled (or one of them stops on its own, which stops the rest), then shuts down
    /// in order: the consumers drain and leave their groups, the projection stops, the
    /// relays finish their batch, the database writers commit what is queued, and the
    /// broker makes its last commits. The log is not closed: it is the caller's.
    pub async fn run(self, shutdown: CancellationToken) -> Result<RunReport, RunError> {
        let System {
            handle,
            consumers,
            relays,
            projection,
            writers,
            writers_stop,
        } = self;
        let writers_stop = writers_stop.disarm();
        let consumers_stop = CancellationToken::new();
        let relays_stop = CancellationToken::new();
        let projection_stop = CancellationToken::new();
        let mut consumer_tasks = JoinSet::new();
        for (service, consumer) in consumers {
            let stop = consumers_stop.clone();
            consumer_tasks.spawn(
                async move { Finished::Consumer(service, consumer.run(stop).await) }
                    .instrument(tracing::info_span!("herald.orders.consumer", %service)),
            );
        }
        let mut relay_tasks = JoinSet::new();
        for (service, relay) in relays {
            let stop = relays_stop.clone();
            relay_tasks.spawn(
                async move { Finished::Relay(service, relay.run(stop).await) }
                    .instrument(tracing::info_span!("herald.orders.relay", %service)),
            );
        }
        let projection_task = tokio::spawn(
            projection
                .run(projection_stop.clone())
                .instrument(tracing::info_span!("herald.orders.analytics_projection")),
        );
        let retention_stop = CancellationToken::new();
        let retention_task = tokio::spawn(
            prune_every_interval(handle.clone(), retention_stop.clone())
                .instrument(tracing::info_span!("herald.orders.retention")),
        );

        let mut outcome = Ending::default();
        tokio::select! {
            () = shutdown.cancelled() => {}
            Some(joined) = consumer_tasks.join_next() => outcome.record(joined, false),
            Some(joined) = relay_tasks.join_next() => outcome.record(joined, false),
        }

        consumers_stop.cancel();
        retention_stop.cancel();
        while let Some(joined) = consumer_tasks.join_next().await {
            outcome.record(joined, true);
        }
        if retention_task.await.is_err() {
            outcome.fail(RunError::Panicked {
                component: "retention".to_owned(),
            });
        }
        projection_stop.cancel();
        if projection_task.await.is_err() {
            outcome.fail(RunError::Panicked {
                component: "analytics projection".to_owned(),
            });
        }
        relays_stop.cancel();
        while let Some(joined) = relay_tasks.join_next().await {
            outcome.record(joined, true);
        }
        writers_stop.cancel();
        for writer in writers {
            if writer.await.is_err() {
                outcome.fail(RunError::Panicked {
                    component: "database writer".to_owned(),
                });
            }
        }
        handle.shared.broker.shutdown().await;
        for db in handle.dbs() {
            db.close().await;
        }
        match outcome.failure {
            Some(error) => Err(error),
            None => Ok(outcome.report),
        }
    }
}

/// Prunes what expired every [`RetentionOptions::interval_ms`] until `stop`.
async fn prune_every_interval(handle: SystemHandle, stop: CancellationToken) {
    let interval = Duration::from_millis(handle.shared.retention.interval_ms);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(interval) => {}
        }
        match handle.prune(chrono::Utc::now()).await {
            Ok(pruned) => tracing::debug!(
                inbox = pruned.inbox,
                idempotency_keys = pruned.idempotency_keys,
                "deleted the expired records"
            ),
            Err(error) => tracing::warn!(error = %error, "deleting the expired records failed"),
        }
    }
}

/// What the tasks of a run ended with: their reports, and the first failure.
#[derive(Default)]
struct Ending {
    report: RunReport,
    failure: Option<RunError>,
}

impl Ending {
    /// Records a finished task; one that ends before the system is `stopping` is a failure.
    fn record(&mut self, joined: Result<Finished, tokio::task::JoinError>, stopping: bool) {
        let error = match joined {
            Ok(Finished::Consumer(service, Ok(done))) => {
                self.report.consumers.insert(service, done);
                (!stopping).then(|| RunError::Stopped {
                    component: format!("consumer of the {service} service"),
                })
            }
            Ok(Finished::Consumer(service, Err(source))) => {
                Some(RunError::Consumer { service, source })
            }
            Ok(Finished::Relay(service, Ok(done))) => {
                self.report.relays.insert(service, done);
                (!stopping).then(|| RunError::Stopped {
                    component: format!("outbox relay of the {service} service"),
                })
            }
            Ok(Finished::Relay(service, Err(source))) => Some(RunError::Relay { service, source }),
            Err(error) => Some(RunError::Panicked {
                component: format!("task {}", error.id()),
            }),
        };
        if let Some(error) = error {
            self.fail(error);
        }
    }

    fn fail(&mut self, error: RunError) {
        tracing::error!(error = %error, "the order system is stopping");
        self.failure.get_or_insert(error);
    }
}

impl SystemHandle {
    /// The `/api/*` routes (see [`crate::api`]), to merge into a server's router. They
    /// have no fallback of their own, so that the merge keeps the server's.
    pub fn api_router(&self) -> axum::Router {
        crate::api::router(self.clone())
    }

    /// The data directory.
    pub fn data_dir(&self) -> &Path {
        &self.shared.data_dir
    }

    /// The topic of the flow.
    pub fn topic(&self) -> &TopicName {
        &self.shared.topic
    }

    /// The embedded log.
    pub fn log(&self) -> &Log {
        &self.shared.log
    }

    /// The broker of the log.
    pub fn broker(&self) -> &Broker {
        &self.shared.broker
    }

    /// The payment gateway, to read and change its switches.
    pub fn gateway(&self) -> &Gateway {
        &self.shared.gateway
    }

    /// Validates and places an order, as `POST /api/orders` does; returns it once it and
    /// its `OrderPlaced` event are committed. With `idempotency_key`, the same key and order
    /// return the first order again.
    pub async fn place(
        &self,
        request: OrderRequest,
        idempotency_key: Option<String>,
    ) -> Result<OrderView, PlaceError> {
        let order = request.validate().map_err(PlaceError::Invalid)?;
        match self
            .shared
            .order
            .place(order, idempotency_key)
            .await
            .map_err(PlaceError::State)?
        {
            Placed::New(view) | Placed::Replayed(view) => Ok(view),
            Placed::KeyReused { order_id } => Err(PlaceError::KeyReused { order_id }),
        }
    }

    /// The order `order_id`, if there is one.
    pub async fn order(&self, order_id: &str) -> Result<Option<OrderView>, db::Error> {
        self.shared.order.get(order_id)
    }

    /// The order once it is settled (completed or cancelled), or as it is when `timeout`
    /// elapses or the waits end ([`end_waits`](Self::end_waits)); `None` if there is no
    /// such order. The order service wakes the caller when it settles the order: nothing
    /// polls.
    pub async fn wait_settled(
        &self,
        order_id: &str,
        timeout: Duration,
    ) -> Result<Option<OrderView>, WaitError> {
        self.shared.order.wait_settled(order_id, timeout).await
    }

    /// The catalog with its stock.
    pub async fn products(&self) -> Result<Vec<ProductView>, db::Error> {
        inventory::products(self.shared.inventory.db()).await
    }

    /// The analytics read model.
    pub async fn analytics(&self) -> Result<AnalyticsView, db::Error> {
        analytics::read(self.shared.analytics.db()).await
    }

    /// Empties the analytics read model and replays the log into it; returns once the
    /// reset is committed.
    pub async fn rebuild_analytics(&self) -> Result<(), RebuildError> {
        self.shared.analytics.rebuild().await
    }

    /// The events of the flow `correlation_id`, in causal order.
    pub async fn audit_trail(&self, correlation_id: &str) -> Result<Vec<AuditEntry>, db::Error> {
        audit::trail(self.shared.audit.db(), correlation_id).await
    }

    /// The e-mails sent about `order_id`, oldest first.
    pub async fn emails(&self, order_id: &str) -> Result<Vec<Email>, db::Error> {
        notification::emails(
            self.shared.notification.db(),
            Some(order_id),
            notification::NOTIFICATIONS_LEN_MAX,
        )
        .await
    }

    /// The dead letters of `service`'s consumer group (at most [`DEAD_LETTERS_LEN_MAX`]).
    pub async fn dead_letters(&self, service: Service) -> Result<Vec<DeadLetter>, StoreError> {
        let Some((group, _, _)) = self.shared.consumers.get(&service) else {
            return Ok(Vec::new());
        };
        self.shared
            .dead_letters
            .list(group, None, DEAD_LETTERS_LEN_MAX)
            .await
    }

    /// Replays the dead letter `event_id` of `service`'s consumer group (it must be
    /// running); `None` when the service has no consumer group.
    pub async fn replay(
        &self,
        service: Service,
        event_id: &str,
    ) -> Option<Result<Replay, consumer::HandleError>> {
        let (_, handle, _) = self.shared.consumers.get(&service)?;
        Some(handle.replay(event_id).await)
    }

    /// Runs `service`'s handler for `message` as if the broker delivered it (again): what
    /// a redelivery after a crash does, without the retry and dead-letter layers. For tests
    /// and debugging tools; `None` when the service has no consumer group.
    pub async fn redeliver(
        &self,
        service: Service,
        message: Message,
    ) -> Option<Result<Outcome, HandlerError>> {
        let (group, _, router) = self.shared.consumers.get(&service)?;
        let delivery = Delivery::new(message, group.clone(), CancellationToken::new());
        Some(router.clone().oneshot(delivery).await)
    }

    /// How many events `service`'s consumer group skipped (types it does not handle).
    pub fn skipped(&self, service: Service) -> u64 {
        self.shared
            .consumers
            .get(&service)
            .map_or(0, |(_, handle, router)| {
                handle.skipped_on_arrival() + router.skipped_count()
            })
    }

    /// Deletes the records kept only against repeats that are older than their retention
    /// at `now` ([`RetentionOptions`]): inbox records of every service, and idempotency
    /// keys. The running system does it every [`RetentionOptions::interval_ms`].
    pub async fn prune(&self, now: chrono::DateTime<chrono::Utc>) -> Result<Pruned, db::Error> {
        let retention = self.shared.retention;
        let ago = |ms: u64| now - chrono::Duration::milliseconds(ms.min(i64::MAX as u64) as i64);
        let mut pruned = Pruned::default();
        for db in self.dbs() {
            // Through the relay's connection: the deletes take turns with the writer.
            let inbox = herald_sql::Inbox::new(db.writes().clone());
            loop {
                let deleted = inbox.prune(ago(retention.inbox_ms), PRUNE_LEN_MAX).await?;
                pruned.inbox += deleted;
                if deleted < u64::from(PRUNE_LEN_MAX) {
                    break;
                }
            }
        }
        pruned.idempotency_keys = self
            .shared
            .order
            .prune_idempotency_keys(ago(retention.idempotency_key_ms), PRUNE_LEN_MAX)
            .await?;
        Ok(pruned)
    }

    /// Checks the system's invariants on its databases (see [`invariants`]). Meaningful
    /// when the system is idle ([`wait_idle`](Self::wait_idle)).
    pub async fn check_invariants(&self) -> Result<InvariantReport, CheckError> {
        invariants::check(&self.shared.data_dir).await
    }

    /// Ends every wait in progress or to come: [`wait_settled`](Self::wait_settled) answers
    /// the order as it is, [`wait_idle`](Self::wait_idle) fails with
    /// [`IdleError::Stopping`]. For a server shutting down, so that no long-poll of the API
    /// holds up its graceful shutdown.
    pub fn end_waits(&self) {
        self.shared.waits_end.cancel();
    }

    /// Waits until the system is idle: every outbox is empty, every consumer group has
    /// committed every event of the topic, the analytics projection has read the whole
    /// log, and nothing was appended to the log meanwhile. Woken by the log's appends and
    /// the projection's progress (nothing polls); gives up after `timeout`, or when the
    /// waits end ([`end_waits`](Self::end_waits)).
    pub async fn wait_idle(&self, timeout: Duration) -> Result<(), IdleError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let check = |error: &dyn std::fmt::Display| IdleError::Check(error.to_string());
        let next = self.log_next().await.map_err(|error| check(&error))?;
        let mut appended = self
            .shared
            .log
            .subscribe_all(Position(next))
            .await
            .map_err(|error| check(&error))?;
        let mut consumed = self.shared.analytics.consumed();
        loop {
            let busy = self.busy().await.map_err(|error| check(&error))?;
            let Some(busy) = busy else { return Ok(()) };
            tokio::select! {
                item = appended.next() => {
                    if item.is_none() {
                        return Err(IdleError::Check("the log subscription ended".to_owned()));
                    }
                    // Take every append already there: one look for the lot.
                    while let Some(Some(_)) = appended.next().now_or_never() {}
                }
                changed = consumed.changed() => {
                    if changed.is_err() {
                        return Err(IdleError::Check("the analytics projection stopped".to_owned()));
                    }
                }
                () = self.shared.waits_end.cancelled() => return Err(IdleError::Stopping),
                () = tokio::time::sleep_until(deadline) => {
                    return Err(IdleError::TimedOut {
                        timeout_ms: timeout.as_millis() as u64,
                        busy,
                    });
                }
            }
        }
    }

    /// The position after the log's last event.
    async fn log_next(&self) -> Result<u64, herald_core::store::Error> {
        Ok(self.shared.log.head().await?.map_or(0, |head| head.0 + 1))
    }

    /// What is still busy, or `None` when the system is idle.
    async fn busy(&self) -> Result<Option<String>, Box<dyn std::error::Error + Send + Sync>> {
        let before = self.log_next().await?;
        let mut busy = Vec::new();
        for (service, (group, _, _)) in &self.shared.consumers {
            let lag: u64 = self
                .shared
                .broker
                .lag(&self.shared.topic, group)
                .await?
                .iter()
                .map(|partition| partition.lag)
                .sum();
            if lag > 0 {
                busy.push(format!("{service}: {lag} events to commit"));
            }
        }
        for service in Service::EMITTING {
            let backlog = herald_sql::status(self.db(service).pool()).await?.backlog;
            if backlog > 0 {
                busy.push(format!("{service}: {backlog} outbox rows"));
            }
        }
        let consumed = *self.shared.analytics.consumed().borrow();
        if consumed < before {
            busy.push(format!("analytics: at {consumed} of {before}"));
        }
        let after = self.log_next().await?;
        if after != before {
            busy.push(format!("log: {} appended meanwhile", after - before));
        }
        Ok((!busy.is_empty()).then(|| busy.join(", ")))
    }

    /// Bounds the `GET /api/idle` requests waiting at once.
    pub(crate) fn idle_waiters(&self) -> &tokio::sync::Semaphore {
        &self.shared.idle_waiters
    }

    pub(crate) fn order_service(&self) -> &OrderService {
        &self.shared.order
    }

    pub(crate) fn payment_db(&self) -> &Db {
        self.shared.payment.db()
    }

    pub(crate) fn inventory_db(&self) -> &Db {
        self.shared.inventory.db()
    }

    pub(crate) fn notification_db(&self) -> &Db {
        self.shared.notification.db()
    }

    pub(crate) fn audit_db(&self) -> &Db {
        self.shared.audit.db()
    }

    pub(crate) fn analytics_db(&self) -> &Db {
        self.shared.analytics.db()
    }

    fn db(&self, service: Service) -> &Db {
        match service {
            Service::Order => self.shared.order.db(),
            Service::Payment => self.shared.payment.db(),
            Service::Inventory => self.shared.inventory.db(),
            Service::Shipping => self.shared.shipping.db(),
            Service::Notification => self.shared.notification.db(),
            Service::Analytics => self.shared.analytics.db(),
            Service::Audit => self.shared.audit.db(),
        }
    }

    fn dbs(&self) -> impl Iterator<Item = &Db> {
        Service::ALL.into_iter().map(|service| self.db(service))
    }
}

impl std::fmt::Debug for SystemHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SystemHandle")
            .field("data_dir", &self.shared.data_dir)
            .field("topic", &self.shared.topic)
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for System {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("System")
            .field("handle", &self.handle)
            .finish_non_exhaustive()
    }
}
