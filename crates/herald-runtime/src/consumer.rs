//! The consumer: runs a pipeline for one member of a consumer group.
//!
//! [`ConsumerOptions::build`] makes a [`ConsumerService`]; [`ConsumerService::run`] joins
//! the group and handles its messages until the shutdown token is cancelled, and a cheap
//! [`Handle`] discards and replays the group's dead letters meanwhile.
//!
//! # Behaviour
//!
//! - **Order per key, parallel across keys.** A message's key is its event's partition key
//!   ([`partition_key`]). Messages of one key are handled strictly one after another, in
//!   arrival order (which the broker keeps per key); messages of different keys are handled
//!   in parallel, at most [`in_flight_max`](ConsumerOptions::in_flight_max) at once. A slow
//!   or failing key only delays its own later messages.
//! - **Outcomes.** [`Outcome::Handled`]: the handler's events are published to
//!   [`publish_topic`](ConsumerOptions::publish_topic) (when set), then the message is
//!   acked. [`Outcome::Duplicate`] (the idempotency layer saw the event handled before):
//!   the events recorded for it are published again — an exact retry, which the embedded
//!   broker stores once — then the message is acked. [`Outcome::Skipped`]: acked.
//!   [`Outcome::DeadLettered`]: the record is put in
//!   the [`DeadLetterStore`], then the message is acked, so a poison event never blocks its
//!   partition. [`Outcome::Abandoned`] (shutdown): not acked, so it is delivered again; the
//!   key runs nothing more in this member.
//! - **Skipping on arrival.** With [`ConsumerService::skip_other_types`], a message of a
//!   type the group does not handle is acked as it arrives and counted as skipped, without
//!   running the pipeline: what a router that skips unknown types would answer, for a
//!   fraction of the work.
//! - **Parking.** With [`OnDeadLetter::ParkKey`], the later messages of a key whose event
//!   was dead-lettered are held — neither handled nor acked — until every dead letter of
//!   that key is discarded ([`Handle::discard`]) or replayed successfully
//!   ([`Handle::replay`]). At start the member parks the keys of the group's dead letters
//!   already in the store. Held messages count towards
//!   [`queued_max`](ConsumerOptions::queued_max): a parked key with that many later
//!   messages stops this member receiving until it is released.
//! - **Graceful shutdown.** When the token is cancelled the member stops receiving, lets the
//!   handlers in flight finish within [`drain_timeout_ms`](ConsumerOptions::drain_timeout_ms)
//!   (a retry waiting for its backoff stops at once, as [`Outcome::Abandoned`]), aborts the
//!   rest, acks what finished, and closes its consumer, so the group commits. After a clean
//!   shutdown no finished message is handled again by the group.
//!
//! - **Replays.** [`Handle::replay`] queues a dead letter of the group ahead of its key's
//!   held events. Replays requested through the store from another process (`herald dlq
//!   replay` on the embedded log) are picked up every
//!   [`replay_poll_interval_ms`](ConsumerOptions::replay_poll_interval_ms) the same way. A
//!   replay that succeeds is removed from the store as
//!   [replayed](DeadLetterStore::replayed); one that fails again replaces its record.
//!
//! # Acks
//!
//! A message is acked as soon as its delivery settles: the receive task gives way to acks
//! while it waits in [`Consumer::recv`], which the broker contract makes cancel-safe. So
//! an idle topic does not hold acks back, and a member that shuts down has applied every
//! ack before it leaves its group.
//!
//! # Tasks
//!
//! [`ConsumerService::run`] is the scheduler. It owns four kinds of tasks, each in a
//! tracing span named for it: one `herald.consumer.receive` task that owns the broker
//! [`Consumer`] (receives, acks, and closes it at the end), one
//! `herald.consumer.replay_requests` task polling the store, one `herald.consumer.lag`
//! task recording the group's lag ([`crate::lag`]), and one
//! `herald.consumer.handle` task per message in flight. All are joined before `run`
//! returns.

use std::collections::hash_map::Entry;
use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use herald_core::broker::{
    self, Consumer, GroupName, Message, Publisher, Subscriber, TopicName, partition_key,
};
use herald_core::stream::InvalidStreamName;
use serde::{Deserialize, Serialize};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};
use tokio::task::{JoinHandle, JoinSet};
use tokio_util::sync::CancellationToken;
use tower::ServiceExt as _;
use tower_service::Service;
use tracing::Instrument as _;

use crate::Pipeline;
use crate::dead_letter_store::{DeadLetterStore, StoreError, dead_letter_id};
use crate::delivery::{DeadLetter, Delivery, Outcome};
use crate::lag::LagOptions;

/// Counter of the dead letters a consumer stored, labelled `group` and `topic`.
pub const DEAD_LETTERS_TOTAL: &str = "herald_dead_letters_total";

/// What a consumer does with the later events of a key whose event was dead-lettered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnDeadLetter {
    /// Handle them as usual: the dead-lettered event is out of the way.
    #[default]
    Continue,
    /// Hold them, un-acked, until the key's dead letters are discarded or replayed.
    ParkKey,
}

/// The bounds and policies of a consumer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ConsumerOptions {
    /// How many messages are handled at once, each of a different key.
    pub in_flight_max: usize,
    /// How many messages this member holds un-acked at once: queued behind their key,
    /// parked, in flight, or finished and waiting for their ack. At least `in_flight_max`.
    pub queued_max: usize,
    /// How long a shutdown waits for the handlers in flight before it aborts them.
    pub drain_timeout_ms: u64,
    /// What happens to the later events of a dead-lettered key.
    pub on_dead_letter: OnDeadLetter,
    /// The topic the events a handler publishes go to; `None`: they are not published.
    pub publish_topic: Option<String>,
    /// How often the dead-letter store is asked for replays requested from outside the
    /// process ([`DeadLetterStore::replay_requests`], e.g. by `herald dlq replay`); 0: never.
    pub replay_poll_interval_ms: u64,
    /// How often the group's lag is read from the broker and recorded in the gauge
    /// [`CONSUMER_LAG`](crate::lag::CONSUMER_LAG); 0: never.
    pub lag_interval_ms: u64,
}

impl Default for ConsumerOptions {
    fn default() -> Self {
        ConsumerOptions {
            in_flight_max: 64,
            queued_max: 1_024,
            drain_timeout_ms: 10_000,
            on_dead_letter: OnDeadLetter::Continue,
            publish_topic: None,
            replay_poll_interval_ms: 1_000,
            lag_interval_ms: LagOptions::default().interval_ms,
        }
    }
}

/// Why a consumer could not be built.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BuildError {
    /// `publish_topic` is not a valid topic name.
    #[error("invalid publish topic")]
    PublishTopic(#[source] InvalidStreamName),
    /// A bound is out of range.
    #[error("`{option}` must be {expected}")]
    Bound {
        /// The option.
        option: &'static str,
        /// What it must be.
        expected: &'static str,
    },
}

/// Why a consumer stopped with an error. Whatever it was, the member has left its group
/// and its un-acked messages go to the other members.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Joining the group failed.
    #[error("failed to join group `{group}` on topic `{topic}`")]
    Subscribe {
        /// The topic.
        topic: TopicName,
        /// The group.
        group: GroupName,
        /// The broker's error.
        #[source]
        source: broker::Error,
    },
    /// Reading the group's dead letters at start failed.
    #[error("failed to read the dead letters of group `{group}`")]
    ReadDeadLetters {
        /// The group.
        group: GroupName,
        /// The store's error.
        #[source]
        source: StoreError,
    },
    /// Publishing a handler's events failed; the message was left un-acked.
    #[error("failed to publish the events caused by event `{event_id}`")]
    Publish {
        /// The handled event.
        event_id: String,
        /// The broker's error.
        #[source]
        source: broker::Error,
    },
    /// Storing (or, after a replay, discarding) a dead letter failed; the message was left
    /// un-acked.
    #[error("failed to store the dead letter of event `{event_id}`")]
    StoreDeadLetter {
        /// The dead-lettered event.
        event_id: String,
        /// The store's error.
        #[source]
        source: StoreError,
    },
    /// A handler panicked: a bug. The message was left un-acked.
    #[error("the handler of key `{key}` panicked")]
    Panicked {
        /// The key whose handler panicked.
        key: String,
    },
    /// Closing the consumer failed: what was acked may not be committed.
    #[error("failed to close the consumer")]
    Close(#[source] broker::Error),
}

/// Why a [`Handle`] operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HandleError {
    /// The dead-letter store failed.
    #[error("dead-letter store failure")]
    Store(#[source] StoreError),
    /// The consumer is not running, so it cannot replay.
    #[error("the consumer is not running")]
    Stopped,
}

/// What became of a replay request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Replay {
    /// The dead letter is queued to be handled again, ahead of its key's held events.
    Queued,
    /// A replay of this dead letter is already queued or running: nothing more to do.
    AlreadyQueued,
    /// The group has no dead letter with this id.
    NotFound,
    /// `in_flight_max` replays are queued already; try again later.
    Busy,
}

/// What a consumer did, returned when it stops.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct Report {
    /// Deliveries handled (replays included).
    pub handled: u64,
    /// Deliveries of events the group had handled before (the idempotency layer's
    /// [`Outcome::Duplicate`]): their recorded events published again, not handled again.
    pub duplicates: u64,
    /// Deliveries skipped for an unknown type.
    pub skipped: u64,
    /// Deliveries dead-lettered (failed replays included).
    pub dead_lettered: u64,
    /// Deliveries started but not finished at shutdown; their messages stay un-acked.
    pub abandoned: u64,
    /// Messages received but never started (queued or parked at shutdown); un-acked.
    pub held: u64,
}

/// A consumer ready to run; see the [module documentation](self).
pub struct ConsumerService<S = Pipeline> {
    options: ConsumerOptions,
    publish_topic: Option<TopicName>,
    subscriber: Arc<dyn Subscriber>,
    publisher: Arc<dyn Publisher>,
    dead_letters: Arc<dyn DeadLetterStore>,
    topic: TopicName,
    group: GroupName,
    pipeline: S,
    commands_tx: mpsc::Sender<Command>,
    commands_rx: mpsc::Receiver<Command>,
    /// With [`skip_other_types`](ConsumerService::skip_other_types): the types that reach
    /// the pipeline.
    types: Option<Arc<HashSet<String>>>,
    /// Messages acked on arrival for their type.
    skipped_on_arrival: Arc<AtomicU64>,
}

/// Talks to a running consumer: discards and replays its group's dead letters, and tells
/// how many messages it skipped on arrival. Cheap to clone.
#[derive(Clone)]
pub struct Handle {
    group: GroupName,
    dead_letters: Arc<dyn DeadLetterStore>,
    commands: mpsc::Sender<Command>,
    skipped_on_arrival: Arc<AtomicU64>,
}

impl ConsumerOptions {
    /// A consumer of `group` on `topic`, handling each message with `pipeline`,
    /// publishing through `publisher` and keeping dead letters in `dead_letters`.
    pub fn build<S>(
        self,
        subscriber: Arc<dyn Subscriber>,
        publisher: Arc<dyn Publisher>,
        dead_letters: Arc<dyn DeadLetterStore>,
        topic: TopicName,
        group: GroupName,
        pipeline: S,
    ) -> Result<ConsumerService<S>, BuildError>
    where
        S: Service<Delivery, Response = Outcome, Error = Infallible> + Clone + Send + 'static,
        S::Future: Send + 'static,
    {
        if self.in_flight_max == 0 {
            return Err(BuildError::Bound {
                option: "in_flight_max",
                expected: "at least 1",
            });
        }
        if self.queued_max < self.in_flight_max {
            return Err(BuildError::Bound {
                option: "queued_max",
                expected: "at least in_flight_max",
            });
        }
        let publish_topic = self
            .publish_topic
            .as_deref()
            .map(TopicName::new)
            .transpose()
            .map_err(BuildError::PublishTopic)?;
        let (commands_tx, commands_rx) = mpsc::channel(COMMANDS_MAX);
        Ok(ConsumerService {
            options: self,
            publish_topic,
            subscriber,
            publisher,
            dead_letters,
            topic,
            group,
            pipeline,
            commands_tx,
            commands_rx,
            types: None,
            skipped_on_arrival: Arc::new(AtomicU64::new(0)),
        })
    }
}

impl<S> ConsumerService<S>
where
    S: Service<Delivery, Response = Outcome, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    /// A handle to this consumer, for its dead letters.
    pub fn handle(&self) -> Handle {
        Handle {
            group: self.group.clone(),
            dead_letters: Arc::clone(&self.dead_letters),
            commands: self.commands_tx.clone(),
            skipped_on_arrival: Arc::clone(&self.skipped_on_arrival),
        }
    }

    /// Acks every message whose type is not one of `types` as soon as it arrives, without
    /// running the pipeline, and counts it as skipped: in [`Report::skipped`],
    /// [`Handle::skipped_on_arrival`] and [`EVENTS_HANDLED_TOTAL`](crate::EVENTS_HANDLED_TOTAL)
    /// (outcome `skipped`, as the metrics layer counts it). For a pipeline whose router
    /// skips the types it has no handler for ([`UnknownType::Skip`](crate::UnknownType),
    /// the default): give it [`Router::types`](crate::Router::types), and the outcome is the
    /// same without a task, a span, a timer and the stack's work for each such message —
    /// most of a topic's messages, for a group that handles a few of its types. A skipped
    /// message does not wait behind the earlier messages of its key.
    pub fn skip_other_types<T: Into<String>>(mut self, types: impl IntoIterator<Item = T>) -> Self {
        self.types = Some(Arc::new(types.into_iter().map(Into::into).collect()));
        self
    }

    /// Joins the group and handles its messages until `shutdown` is cancelled (or the
    /// broker stops delivering), then drains, acks what finished, and leaves the group.
    pub async fn run(self, shutdown: CancellationToken) -> Result<Report, Error> {
        let ConsumerService {
            options,
            publish_topic,
            subscriber,
            publisher,
            dead_letters,
            topic,
            group,
            pipeline,
            commands_tx,
            commands_rx,
            types,
            skipped_on_arrival,
        } = self;

        let mut parked: HashMap<String, BTreeSet<String>> = HashMap::new();
        if options.on_dead_letter == OnDeadLetter::ParkKey {
            parked = parked_keys(dead_letters.as_ref(), &group).await?;
        }
        let consumer = subscriber
            .subscribe(&topic, &group)
            .await
            .map_err(|source| Error::Subscribe {
                topic: topic.clone(),
                group: group.clone(),
                source,
            })?;

        let receiving = CancellationToken::new();
        let poller = (options.replay_poll_interval_ms > 0).then(|| {
            tokio::spawn(
                poll_replay_requests(
                    Arc::clone(&dead_letters),
                    group.clone(),
                    commands_tx.clone(),
                    options.replay_poll_interval_ms,
                    receiving.clone(),
                )
                .instrument(tracing::info_span!("herald.consumer.replay_requests", %group)),
            )
        });
        let lag = (options.lag_interval_ms > 0).then(|| {
            let reporter = LagOptions {
                interval_ms: options.lag_interval_ms,
            }
            .build(Arc::clone(&subscriber), topic.clone(), group.clone())
            .expect("the interval is at least 1");
            tokio::spawn(reporter.run(receiving.clone()))
        });
        // The scheduler keeps no sender: the command channel closes when every handle (and
        // the replay-request task) is gone.
        drop(commands_tx);

        let (messages_tx, messages_rx) = mpsc::channel(options.queued_max);
        let (acks_tx, acks_rx) = mpsc::channel(options.queued_max);
        let receiver = tokio::spawn(
            receive(
                consumer,
                Arc::new(Semaphore::new(options.queued_max)),
                messages_tx,
                acks_rx,
                receiving.clone(),
                types.map(|types| Skip {
                    types,
                    group: group.clone(),
                    skipped: Arc::clone(&skipped_on_arrival),
                    counters: HashMap::new(),
                }),
            )
            .instrument(tracing::info_span!("herald.consumer.receive", %group, %topic)),
        );
        let work = Arc::new(Work {
            publisher,
            publish_topic,
            dead_letters,
            group,
            shutdown: shutdown.clone(),
        });
        let mut scheduler = Scheduler {
            options,
            pipeline,
            work,
            keys: HashMap::new(),
            ready: VecDeque::new(),
            held: HashSet::new(),
            replaying: HashSet::new(),
            tasks: JoinSet::new(),
            task_keys: HashMap::new(),
            acks: acks_tx,
            report: Report::default(),
            failure: None,
        };
        for (key, ids) in parked {
            scheduler.key(&key).parked_by = ids;
        }
        let stopped = scheduler
            .run(
                shutdown,
                receiving.clone(),
                messages_rx,
                commands_rx,
                receiver,
            )
            .await;
        receiving.cancel();
        for task in poller.into_iter().chain(lag) {
            if let Err(error) = task.await
                && error.is_panic()
            {
                std::panic::resume_unwind(error.into_panic());
            }
        }
        stopped.map(|mut report| {
            report.skipped += skipped_on_arrival.load(Ordering::Relaxed);
            report
        })
    }
}

impl Handle {
    /// How many messages the consumer acked on arrival for their type
    /// ([`ConsumerService::skip_other_types`]), since it was built.
    pub fn skipped_on_arrival(&self) -> u64 {
        self.skipped_on_arrival.load(Ordering::Relaxed)
    }

    /// Discards the dead letter `id` of this consumer's group; with
    /// [`OnDeadLetter::ParkKey`], its key's held events continue once the key has no other
    /// dead letter. Returns the record, or `None` if there was none (a discard is
    /// idempotent). Works whether or not the consumer is running.
    pub async fn discard(&self, id: &str) -> Result<Option<DeadLetter>, HandleError> {
        let discarded = self
            .dead_letters
            .discard(&self.group, id)
            .await
            .map_err(HandleError::Store)?;
        if let Some(dead_letter) = &discarded {
            let release = Command::Release {
                key: partition_key(&dead_letter.event).to_owned(),
                id: id.to_owned(),
            };
            // A consumer that is not running has no key to release: it parks the keys of
            // the store's records when it starts.
            let _ = self.commands.send(release).await;
        }
        Ok(discarded)
    }

    /// Hands the dead letter `id` of this consumer's group to the pipeline again, ahead of
    /// the events its key holds. When it is handled (or skipped) its record is removed and
    /// the key continues; when it is dead-lettered again, the record is replaced and the key
    /// stays parked. Idempotent: a replay already queued is not queued twice, and a
    /// replayed record is gone.
    pub async fn replay(&self, id: &str) -> Result<Replay, HandleError> {
        let Some(dead_letter) = self
            .dead_letters
            .get(&self.group, id)
            .await
            .map_err(HandleError::Store)?
        else {
            return Ok(Replay::NotFound);
        };
        let (reply, replied) = oneshot::channel();
        let replay = Command::Replay {
            dead_letter: Box::new(dead_letter),
            reply,
        };
        self.commands
            .send(replay)
            .await
            .map_err(|_| HandleError::Stopped)?;
        replied.await.map_err(|_| HandleError::Stopped)
    }
}

impl std::fmt::Debug for Handle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Handle")
            .field("group", &self.group)
            .finish_non_exhaustive()
    }
}

impl<S> std::fmt::Debug for ConsumerService<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConsumerService")
            .field("topic", &self.topic)
            .field("group", &self.group)
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

/// How many handle requests wait for the scheduler at most.
const COMMANDS_MAX: usize = 16;

/// How many dead letters are read per page when parking keys at start.
const DEAD_LETTERS_PAGE_COUNT_MAX: usize = 256;

/// How many requested replays are read per poll at most.
const REPLAY_REQUESTS_COUNT_MAX: usize = 64;

/// How long the receive task waits after a failed `recv` before the next.
const RECV_ERROR_DELAY_MS: u64 = 100;

/// A request from a [`Handle`] to the scheduler.
enum Command {
    /// The dead letter `id` of `key` was discarded.
    Release { key: String, id: String },
    /// Handle this dead letter again.
    Replay {
        dead_letter: Box<DeadLetter>,
        reply: oneshot::Sender<Replay>,
    },
}

/// A message received, with the permit that bounds how many are held un-acked.
struct Received {
    message: Message,
    // Held until the message is acked or dropped.
    _permit: OwnedSemaphorePermit,
}

/// Something to run through the pipeline.
enum Item {
    /// A message from the broker: acked when it settles.
    Message(Received),
    /// A dead letter replayed: its message was acked when it was dead-lettered.
    Replay(DeadLetter),
}

/// The state of one key: only keys with work queued, running, or parked have one.
#[derive(Default)]
struct Key {
    queue: VecDeque<Item>,
    running: bool,
    /// In the scheduler's ready queue.
    ready: bool,
    /// A delivery of this key was abandoned or failed: nothing more runs for it here.
    stuck: bool,
    /// The ids of the dead letters parking this key.
    parked_by: BTreeSet<String>,
}

/// What a handler task needs besides the pipeline.
struct Work {
    publisher: Arc<dyn Publisher>,
    publish_topic: Option<TopicName>,
    dead_letters: Arc<dyn DeadLetterStore>,
    group: GroupName,
    shutdown: CancellationToken,
}

/// How a delivery settled.
enum Settled {
    Handled,
    Duplicate,
    Skipped,
    DeadLettered { id: String },
    Abandoned,
}

/// A handler task's result.
struct Completion {
    key: String,
    /// The message to ack; `None` for a replay.
    received: Option<Received>,
    /// The id of the dead letter replayed.
    replay_id: Option<String>,
    settled: Result<Settled, Error>,
}

/// The scheduler's state.
struct Scheduler<S> {
    options: ConsumerOptions,
    pipeline: S,
    work: Arc<Work>,
    keys: HashMap<String, Key>,
    /// Keys that may start their next item, each at most once.
    ready: VecDeque<String>,
    /// The (partition, offset) of every message held, to drop a second delivery of one.
    held: HashSet<(u32, u64)>,
    /// The ids of the dead letters queued or running as replays.
    replaying: HashSet<String>,
    tasks: JoinSet<Completion>,
    task_keys: HashMap<tokio::task::Id, String>,
    acks: mpsc::Sender<Received>,
    report: Report,
    failure: Option<Error>,
}

impl<S> Scheduler<S>
where
    S: Service<Delivery, Response = Outcome, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    async fn run(
        mut self,
        shutdown: CancellationToken,
        receiving: CancellationToken,
        mut messages: mpsc::Receiver<Option<Received>>,
        mut commands: mpsc::Receiver<Command>,
        receiver: JoinHandle<Result<(), broker::Error>>,
    ) -> Result<Report, Error> {
        let mut commands_open = true;
        loop {
            self.start();
            tokio::select! {
                biased;
                () = shutdown.cancelled() => break,
                Some(joined) = self.tasks.join_next_with_id(), if !self.tasks.is_empty() => {
                    self.joined(joined);
                    if self.failure.is_some() {
                        break;
                    }
                }
                command = commands.recv(), if commands_open => match command {
                    Some(command) => self.command(command),
                    None => commands_open = false,
                },
                received = messages.recv() => match received {
                    Some(Some(received)) => self.received(received),
                    // The broker delivers nothing more.
                    Some(None) | None => break,
                },
            }
        }

        // Drain: receive nothing more, start nothing more, wait for what runs.
        receiving.cancel();
        drop(messages);
        drop(commands);
        let deadline =
            tokio::time::Instant::now() + Duration::from_millis(self.options.drain_timeout_ms);
        while !self.tasks.is_empty() {
            tokio::select! {
                biased;
                Some(joined) = self.tasks.join_next_with_id() => self.joined(joined),
                () = tokio::time::sleep_until(deadline) => {
                    tracing::warn!(
                        in_flight = self.tasks.len(),
                        "drain timeout elapsed: aborting the handlers in flight"
                    );
                    self.tasks.abort_all();
                    while let Some(joined) = self.tasks.join_next_with_id().await {
                        self.joined(joined);
                    }
                }
            }
        }
        self.report.held = self
            .keys
            .values()
            .flat_map(|key| &key.queue)
            .filter(|item| matches!(item, Item::Message(_)))
            .count() as u64;
        // Dropping the held messages and the ack sender lets the receive task ack what
        // finished and close the consumer.
        let Scheduler {
            keys,
            acks,
            report,
            failure,
            ..
        } = self;
        drop(keys);
        drop(acks);
        let closed = match receiver.await {
            Ok(closed) => closed,
            Err(error) => std::panic::resume_unwind(error.into_panic()),
        };
        if let Some(failure) = failure {
            return Err(failure);
        }
        closed.map_err(Error::Close)?;
        Ok(report)
    }

    /// Starts items of ready keys while there is room.
    fn start(&mut self) {
        while self.tasks.len() < self.options.in_flight_max {
            let Some(name) = self.ready.pop_front() else {
                return;
            };
            let Some(key) = self.keys.get_mut(&name) else {
                continue;
            };
            key.ready = false;
            if !runnable(key) {
                continue;
            }
            let item = key.queue.pop_front().expect("a runnable key has an item");
            key.running = true;
            let pipeline = self.pipeline.clone();
            let work = Arc::clone(&self.work);
            let task = handle(pipeline, work, name.clone(), item)
                .instrument(tracing::info_span!("herald.consumer.handle", key = %name));
            // Boxed: the task's future is large, and the spawn path would otherwise copy
            // it several times per message.
            let id = self.tasks.spawn(Box::pin(task)).id();
            self.task_keys.insert(id, name);
        }
    }

    /// A message arrived: queue it behind its key.
    fn received(&mut self, received: Received) {
        let message = &received.message;
        if !self.held.insert((message.partition, message.offset)) {
            // Delivered again (the partition came back after a rebalance) while this
            // member still holds it: the copy held already stands for it.
            return;
        }
        let name = partition_key(&message.event).to_owned();
        self.key(&name).queue.push_back(Item::Message(received));
        self.schedule(&name);
    }

    fn command(&mut self, command: Command) {
        match command {
            Command::Release { key: name, id } => {
                if let Some(key) = self.keys.get_mut(&name) {
                    key.parked_by.remove(&id);
                    self.schedule(&name);
                }
            }
            Command::Replay { dead_letter, reply } => {
                let id = dead_letter_id(&dead_letter).to_owned();
                let answer = if self.replaying.contains(&id) {
                    Replay::AlreadyQueued
                } else if self.replaying.len() >= self.options.in_flight_max {
                    Replay::Busy
                } else {
                    self.replaying.insert(id);
                    let name = partition_key(&dead_letter.event).to_owned();
                    self.key(&name).queue.push_front(Item::Replay(*dead_letter));
                    self.schedule(&name);
                    Replay::Queued
                };
                // The caller may have stopped waiting: nothing to do then.
                let _ = reply.send(answer);
            }
        }
    }

    /// A handler task ended.
    fn joined(&mut self, joined: Result<(tokio::task::Id, Completion), tokio::task::JoinError>) {
        let completion = match joined {
            Ok((id, completion)) => {
                self.task_keys.remove(&id);
                completion
            }
            Err(error) => {
                let name = self
                    .task_keys
                    .remove(&error.id())
                    .expect("every task has a key");
                if error.is_panic() {
                    tracing::error!(key = %name, "handler panicked: stopping the consumer");
                    self.failure
                        .get_or_insert(Error::Panicked { key: name.clone() });
                } else {
                    self.report.abandoned += 1;
                }
                // Its message, if any, was dropped with the task: un-acked.
                self.settle_key(&name, true);
                return;
            }
        };
        let Completion {
            key: name,
            received,
            replay_id,
            settled,
        } = completion;
        if let Some(received) = &received {
            self.held
                .remove(&(received.message.partition, received.message.offset));
        }
        if let Some(id) = &replay_id {
            self.replaying.remove(id);
        }
        let (ack, stuck) = match settled {
            Ok(Settled::Handled) => {
                self.report.handled += 1;
                (true, false)
            }
            Ok(Settled::Duplicate) => {
                self.report.duplicates += 1;
                (true, false)
            }
            Ok(Settled::Skipped) => {
                self.report.skipped += 1;
                (true, false)
            }
            Ok(Settled::DeadLettered { id }) => {
                self.report.dead_lettered += 1;
                if self.options.on_dead_letter == OnDeadLetter::ParkKey {
                    self.key(&name).parked_by.insert(id);
                }
                (true, false)
            }
            Ok(Settled::Abandoned) => {
                self.report.abandoned += 1;
                (false, true)
            }
            Err(error) => {
                tracing::error!(key = %name, error = %error, "stopping the consumer");
                self.failure.get_or_insert(error);
                (false, true)
            }
        };
        if ack && let Some(id) = &replay_id {
            // A replay that succeeded no longer parks its key.
            if let Some(key) = self.keys.get_mut(&name) {
                key.parked_by.remove(id);
            }
        }
        if ack && let Some(received) = received {
            // The channel holds as many messages as there are permits, so it is never full;
            // it is closed only if the receive task died, and then the ack is moot.
            if self.acks.try_send(received).is_err() {
                tracing::warn!(key = %name, "the receive task is gone: message left un-acked");
            }
        }
        self.settle_key(&name, stuck);
    }

    /// The running item of `name` settled: schedule its next, or forget the key.
    fn settle_key(&mut self, name: &str, stuck: bool) {
        let Some(key) = self.keys.get_mut(name) else {
            return;
        };
        key.running = false;
        key.stuck |= stuck;
        if key.queue.is_empty() && key.parked_by.is_empty() && !key.stuck {
            self.keys.remove(name);
            return;
        }
        self.schedule(name);
    }

    /// Puts `name` in the ready queue if it can start its next item.
    fn schedule(&mut self, name: &str) {
        let Some(key) = self.keys.get_mut(name) else {
            return;
        };
        if !key.ready && runnable(key) {
            key.ready = true;
            self.ready.push_back(name.to_owned());
        }
    }

    fn key(&mut self, name: &str) -> &mut Key {
        match self.keys.entry(name.to_owned()) {
            Entry::Occupied(entry) => entry.into_mut(),
            Entry::Vacant(entry) => entry.insert(Key::default()),
        }
    }
}

/// Whether `key` can start its next item: a replay goes ahead of a park.
fn runnable(key: &Key) -> bool {
    if key.running || key.stuck {
        return false;
    }
    match key.queue.front() {
        None => false,
        Some(Item::Replay(_)) => true,
        Some(Item::Message(_)) => key.parked_by.is_empty(),
    }
}

/// The keys of `group`'s dead letters in the store, each with the ids parking it.
async fn parked_keys(
    dead_letters: &dyn DeadLetterStore,
    group: &GroupName,
) -> Result<HashMap<String, BTreeSet<String>>, Error> {
    let mut parked: HashMap<String, BTreeSet<String>> = HashMap::new();
    let mut after: Option<String> = None;
    loop {
        let page = dead_letters
            .list(group, after.as_deref(), DEAD_LETTERS_PAGE_COUNT_MAX)
            .await
            .map_err(|source| Error::ReadDeadLetters {
                group: group.clone(),
                source,
            })?;
        let Some(last) = page.last() else {
            return Ok(parked);
        };
        after = Some(dead_letter_id(last).to_owned());
        for dead_letter in &page {
            parked
                .entry(partition_key(&dead_letter.event).to_owned())
                .or_default()
                .insert(dead_letter_id(dead_letter).to_owned());
        }
    }
}

/// The messages the receive task acks on arrival: those of other types than `types`.
struct Skip {
    types: Arc<HashSet<String>>,
    group: GroupName,
    skipped: Arc<AtomicU64>,
    /// The skipped counter of each type met so far, so that counting one is not a lookup
    /// in the metrics registry.
    counters: HashMap<String, metrics::Counter>,
}

impl Skip {
    /// Whether `message` is of a type to skip; if so, counts it.
    fn skips(&mut self, message: &Message) -> bool {
        let ty = &message.event.ty;
        if self.types.contains(ty) {
            return false;
        }
        self.skipped.fetch_add(1, Ordering::Relaxed);
        if !self.counters.contains_key(ty) {
            let counter = metrics::counter!(
                crate::EVENTS_HANDLED_TOTAL,
                "group" => self.group.to_string(),
                "type" => ty.clone(),
                "outcome" => Outcome::Skipped.as_str(),
            );
            self.counters.insert(ty.clone(), counter);
        }
        self.counters[ty].increment(1);
        true
    }
}

/// The receive task: owns the consumer. Receives while `receiving` is not cancelled and a
/// permit is free, and applies each ack as soon as it arrives (acking at once the messages
/// `skip` names); once told to stop, acks until the scheduler drops the ack sender, then
/// closes the consumer.
async fn receive(
    mut consumer: Box<dyn Consumer>,
    permits: Arc<Semaphore>,
    messages: mpsc::Sender<Option<Received>>,
    mut acks: mpsc::Receiver<Received>,
    receiving: CancellationToken,
    mut skip: Option<Skip>,
) -> Result<(), broker::Error> {
    'receiving: loop {
        let permit = tokio::select! {
            biased;
            () = receiving.cancelled() => break,
            // No permit free: only acks can free one.
            Some(received) = acks.recv() => {
                ack(consumer.as_mut(), received).await;
                continue;
            }
            permit = Arc::clone(&permits).acquire_owned() => {
                permit.expect("the semaphore is never closed")
            }
        };
        // `recv` is cancel-safe (the broker contract), so it can give way to an ack and be
        // called again without losing a message.
        let received = loop {
            let next = tokio::select! {
                biased;
                () = receiving.cancelled() => break 'receiving,
                Some(received) = acks.recv() => Next::Ack(received),
                received = consumer.recv() => Next::Received(received),
            };
            match next {
                Next::Ack(received) => ack(consumer.as_mut(), received).await,
                Next::Received(received) => break received,
            }
        };
        match received {
            Some(Ok(message)) => {
                if skip.as_mut().is_some_and(|skip| skip.skips(&message)) {
                    ack(
                        consumer.as_mut(),
                        Received {
                            message,
                            _permit: permit,
                        },
                    )
                    .await;
                    continue;
                }
                // The channel holds as many messages as there are permits: never full.
                if messages
                    .try_send(Some(Received {
                        message,
                        _permit: permit,
                    }))
                    .is_err()
                {
                    break;
                }
            }
            Some(Err(error)) => {
                tracing::warn!(error = %error, "receiving failed: trying again");
                tokio::select! {
                    () = receiving.cancelled() => break,
                    () = tokio::time::sleep(Duration::from_millis(RECV_ERROR_DELAY_MS)) => {}
                }
            }
            None => {
                let _ = messages.try_send(None);
                break;
            }
        }
    }
    drop(messages);
    while let Some(received) = acks.recv().await {
        ack(consumer.as_mut(), received).await;
    }
    consumer.close().await
}

/// What the receive task got first: an ack to apply or the result of `recv`.
enum Next {
    Ack(Received),
    Received(Option<Result<Message, broker::Error>>),
}

/// The replay-request task: every `interval_ms` (from the start), asks the store for the
/// group's requested replays and hands each to the scheduler, which queues it unless it is
/// queued already. Ends when `stop` is cancelled or the scheduler stops taking commands.
async fn poll_replay_requests(
    dead_letters: Arc<dyn DeadLetterStore>,
    group: GroupName,
    commands: mpsc::Sender<Command>,
    interval_ms: u64,
    stop: CancellationToken,
) {
    let mut interval = tokio::time::interval(Duration::from_millis(interval_ms));
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            biased;
            () = stop.cancelled() => return,
            _ = interval.tick() => {}
        }
        let requests = tokio::select! {
            biased;
            () = stop.cancelled() => return,
            requests = dead_letters.replay_requests(&group, REPLAY_REQUESTS_COUNT_MAX) => requests,
        };
        let requests = match requests {
            Ok(requests) => requests,
            Err(error) => {
                tracing::warn!(error = %error, "reading the requested replays failed: trying again later");
                continue;
            }
        };
        for dead_letter in requests {
            let (reply, replied) = oneshot::channel();
            let replay = Command::Replay {
                dead_letter: Box::new(dead_letter),
                reply,
            };
            if commands.send(replay).await.is_err() {
                return;
            }
            // Queued or already queued: done; busy: asked again at the next tick.
            if replied.await.is_err() {
                return;
            }
        }
    }
}

async fn ack(consumer: &mut dyn Consumer, received: Received) {
    let message = &received.message;
    if let Err(error) = consumer.ack(message).await {
        // `NotHeld`: the partition went to another member, which handles it again.
        tracing::warn!(
            partition = message.partition,
            offset = message.offset,
            error = %error,
            "ack failed: the message will be delivered again"
        );
    }
}

/// A handler task: runs `item` through the pipeline and settles its outcome.
async fn handle<S>(pipeline: S, work: Arc<Work>, key: String, item: Item) -> Completion
where
    S: Service<Delivery, Response = Outcome, Error = Infallible> + Send + 'static,
    S::Future: Send + 'static,
{
    let (received, replay) = match item {
        Item::Message(received) => (Some(received), None),
        Item::Replay(dead_letter) => (None, Some(dead_letter)),
    };
    let message = match (&received, &replay) {
        (Some(received), _) => received.message.clone(),
        (None, Some(dead_letter)) => Message {
            topic: dead_letter.topic.clone(),
            partition: dead_letter.partition,
            offset: dead_letter.offset,
            attempt: 1,
            event: dead_letter.event.clone(),
        },
        (None, None) => unreachable!("an item is a message or a replay"),
    };
    let replay_id = replay
        .as_ref()
        .map(|dead_letter| dead_letter_id(dead_letter).to_owned());
    let event_id = message.event.id.clone();
    let delivery = Delivery::new(message, work.group.clone(), work.shutdown.clone());
    let outcome = match pipeline.oneshot(delivery).await {
        Ok(outcome) => outcome,
        Err(never) => match never {},
    };
    let settled = settle(&work, outcome, &event_id, replay_id.as_deref()).await;
    Completion {
        key,
        received,
        replay_id,
        settled,
    }
}

/// Publishes, stores or discards what `outcome` asks for.
async fn settle(
    work: &Work,
    outcome: Outcome,
    event_id: &str,
    replay_id: Option<&str>,
) -> Result<Settled, Error> {
    let store_error = |source| Error::StoreDeadLetter {
        event_id: event_id.to_owned(),
        source,
    };
    let duplicate = matches!(outcome, Outcome::Duplicate { .. });
    let settled = match outcome {
        // A duplicate's recorded events are published again, like a handled event's: the
        // publish that followed its first handling may not have happened, and on the
        // embedded broker publishing the same events again stores nothing new.
        Outcome::Handled { published } | Outcome::Duplicate { published } => {
            if let Some(topic) = &work.publish_topic
                && !published.is_empty()
            {
                work.publisher
                    .publish(topic, published)
                    .await
                    .map_err(|source| Error::Publish {
                        event_id: event_id.to_owned(),
                        source,
                    })?;
            }
            if duplicate {
                Settled::Duplicate
            } else {
                Settled::Handled
            }
        }
        Outcome::Skipped => Settled::Skipped,
        Outcome::DeadLettered(dead_letter) => {
            let id = dead_letter_id(&dead_letter).to_owned();
            let topic = dead_letter.topic.to_string();
            work.dead_letters
                .put(*dead_letter)
                .await
                .map_err(store_error)?;
            metrics::counter!(
                DEAD_LETTERS_TOTAL,
                "group" => work.group.to_string(),
                "topic" => topic,
            )
            .increment(1);
            return Ok(Settled::DeadLettered { id });
        }
        Outcome::Abandoned => return Ok(Settled::Abandoned),
    };
    if let Some(id) = replay_id {
        work.dead_letters
            .replayed(&work.group, id)
            .await
            .map_err(store_error)?;
    }
    Ok(settled)
}
