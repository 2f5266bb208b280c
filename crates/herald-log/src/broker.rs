//! The embedded broker: topics, partitions and consumer groups on the log.
//!
//! A [`Broker`] implements [`Publisher`] and [`Subscriber`] on top of a [`Log`]; its
//! [`Consumer`] is one member of a consumer group. Everything lives in Herald's own system
//! streams (names starting with `$`, see [`StreamName::system`]), so user streams never
//! collide with them:
//!
//! | stream                       | holds                                                      |
//! |------------------------------|------------------------------------------------------------|
//! | `$topics:<topic>`            | one event: the topic's partition count, fixed at creation  |
//! | `$topic:<topic>:<partition>` | the messages of one partition; offset = stream version     |
//! | `$offsets:<group>:<topic>`   | snapshots of the group's committed offsets, newest last    |
//!
//! Topic and group names never contain `:` (see [Names](herald_core::broker#names)), so
//! each of these streams belongs to one topic, or one group on one topic, and no other.
//! The records still name their topic and group; a group reads only the snapshots that are
//! its own.
//!
//! # Contract
//!
//! The broker keeps the contract of [`herald_core::broker`]; restated for this backend:
//!
//! - **Partitioning.** A topic's partition count is fixed the first time the topic is used
//!   (publish, subscribe or [`Broker::create_topic`]) and persisted; it MUST NOT change
//!   afterwards. An event goes to partition `partition_for(partition_key(event), count)`.
//!   Offsets are stream versions: they start at 0 and are contiguous.
//! - **Publish.** [`Publisher::publish`] returns `Ok` only after the log acknowledged every
//!   append, i.e. with the log's durability (by default synced to disk). The events of one
//!   publish are grouped by partition and each group is one log append: a publish is
//!   **atomic per partition, not as a whole**: if it fails, the events of some partitions
//!   may be stored and those of others not. Because a log append is idempotent on event ids,
//!   retrying a failed publish with the same events stores each partition's group at most
//!   once; publishing an event id that is already stored in another append fails (event ids
//!   are unique in the log).
//! - **Order.** Within a partition, a member receives messages in offset order; messages of
//!   different partitions may be interleaved.
//! - **Consumer groups.** Every (topic, group) has one in-process coordinator that
//!   reassigns the partitions on every join, leave, close or drop with the sticky
//!   [`rebalance`](herald_core::broker::rebalance): when a member leaves, only its
//!   partitions move, to the members holding the fewest; when one joins, it takes
//!   partitions from the members holding the most until the group is balanced, and every
//!   other partition stays where it is. A member that keeps a partition keeps its hold, so
//!   its acks and nacks of messages delivered before the rebalance succeed; a member that
//!   loses a partition stops receiving it at once, and its acks and nacks for it fail with
//!   [`Error::NotHeld`]. The new owner starts at the group's committed offset and skips
//!   messages already acked after it. There MUST be one `Broker` per log: two brokers on the
//!   same log do not know each other's members.
//! - **Ack and commit.** The committed offset of a partition is the offset after the longest
//!   prefix of acked messages. [`Consumer::ack`](herald_core::broker::Consumer::ack) returns once the ack is recorded in memory;
//!   one background task per group appends a snapshot of the committed offsets, with the
//!   offsets acked beyond them (as ranges), to `$offsets:<group>:<topic>` soon after (acks
//!   are coalesced: at most one append in flight, never one per ack), and
//!   [`Consumer::close`](herald_core::broker::Consumer::close) returns only after the offsets acked so far are durable.
//! - **Redelivery: at least once.** A message not acked when its member closes, drops or
//!   its process stops is delivered again, to whichever member owns its partition then.
//!   After a restart the group resumes at its durable committed offsets and skips the
//!   durable acks beyond them — so a message acked behind one still held (a parked key)
//!   does not come again after a clean shutdown; acks not yet made durable are lost, and
//!   those messages come again.
//! - **Nack.** [`Consumer::nack`](herald_core::broker::Consumer::nack) rewinds the message's partition for this member to the
//!   message's offset: it and every later message of the partition not yet acked are
//!   delivered again, in order.
//! - **Lag.** [`Subscriber::lag`] reports each partition's head (the next version of its
//!   stream) and the group's committed offset as the commit task last made it durable —
//!   acks recorded only in memory do not count — or, for a group no member of this broker
//!   has joined since it started, the newest snapshot in `$offsets:<group>:<topic>`. It
//!   reads the committed offsets before the heads, so a lag is never negative, and it
//!   creates neither the topic nor the group: an unknown topic fails with
//!   [`Error::UnknownTopic`].
//! - **Cancel-safe receive.** [`Consumer::recv`](herald_core::broker::Consumer::recv) takes a
//!   message from a partition's log subscription and returns it in the same poll; its await
//!   points (subscribing, waiting for the log, a rebalance or a shutdown) hold no message,
//!   and the subscriptions belong to the consumer, not to the `recv` future. A dropped
//!   `recv` loses nothing.
//! - **Attempts.** `attempt` counts deliveries to the group of one (partition, offset). The
//!   counters are kept in memory only: after a restart of the broker (or of the process)
//!   they start again at 1.
//! - **Close.** [`Consumer::close`](herald_core::broker::Consumer::close) leaves the group, commits, and returns; dropping a
//!   consumer leaves the group without waiting (the commit follows in the background).
//!   [`Publisher::close`] only refuses later publishes: every append the log acknowledged is
//!   already durable. [`Broker::shutdown`] makes every consumer's `recv` return `None` and
//!   stops the background tasks after a last commit.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::future::poll_fn;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use herald_core::broker::{
    self, Capabilities, Error, GroupName, Message, PartitionLag, Published, Publisher, Subscriber,
    TopicName, partition_for, partition_key,
};
use herald_core::store::{self, Subscription};
use herald_core::{
    Direction, Event, EventStore, ExpectedVersion, RecordedEvent, StreamName, Version,
};
use parking_lot::Mutex;
use tokio::sync::{Notify, OnceCell, watch};
use tokio::task::JoinHandle;
use tracing::Instrument;

use crate::Log;

/// How a [`Broker`] behaves. Every bound is named with its unit last.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerOptions {
    /// Partitions of a topic created on first use by a publish or a subscribe.
    pub partitions_default: u32,
    /// The most partitions [`Broker::create_topic`] accepts for one topic.
    pub partitions_max: u32,
    /// Events of an offsets stream read per step when a group loads its committed offsets.
    pub offsets_read_batch_len_max: usize,
}

impl BrokerOptions {
    /// The defaults: 8 partitions per topic.
    pub fn new() -> Self {
        BrokerOptions {
            partitions_default: 8,
            partitions_max: 1024,
            offsets_read_batch_len_max: 64,
        }
    }
}

impl Default for BrokerOptions {
    fn default() -> Self {
        Self::new()
    }
}

/// The embedded broker on a [`Log`]. Cheap to clone; every clone is a handle to the same
/// broker. Dropping the last handle shuts it down as [`Broker::shutdown`] does, without
/// waiting.
#[derive(Clone)]
pub struct Broker {
    inner: Arc<Inner>,
}

/// One member of a consumer group of a [`Broker`] (see [`Subscriber::subscribe`]).
///
/// Pull-based: it reads its partitions' streams only while [`recv`](herald_core::broker::Consumer::recv) is awaited,
/// each through its own log subscription, taking them in turn so that no partition starves
/// the others. Nothing is queued beyond the log subscriptions' own pages.
pub struct Consumer {
    member: u64,
    group: Arc<Group>,
    log: Log,
    generation: watch::Receiver<u64>,
    shutdown: watch::Receiver<bool>,
    /// The partitions this member reads, by partition.
    cursors: BTreeMap<u32, Cursor>,
    /// Where the next poll of the partitions starts (round-robin).
    rotate: usize,
    left: bool,
}

impl Broker {
    /// A broker on `log`. Must be called within a tokio runtime: groups run background
    /// commit tasks on it.
    pub fn new(log: Log, options: BrokerOptions) -> Broker {
        Broker {
            inner: Arc::new(Inner {
                log,
                options,
                topics: Mutex::new(HashMap::new()),
                groups: Mutex::new(HashMap::new()),
                committers: Mutex::new(Vec::new()),
                shutdown: watch::Sender::new(false),
                publisher_closed: AtomicBool::new(false),
                next_member: AtomicU64::new(0),
            }),
        }
    }

    /// Creates `topic` with `partitions` partitions unless it exists; returns the topic's
    /// partition count, which is the existing one if it already existed.
    pub async fn create_topic(&self, topic: &TopicName, partitions: u32) -> Result<u32, Error> {
        if partitions == 0 || partitions > self.inner.options.partitions_max {
            return Err(backend(InvalidPartitions {
                partitions,
                partitions_max: self.inner.options.partitions_max,
            }));
        }
        Ok(self.inner.topic(topic, partitions).await?.streams.len() as u32)
    }

    /// Stops the broker: every consumer's `recv` returns `None` from now on, new publishes
    /// and subscriptions fail with [`Error::Closed`], and each group's commit task makes a
    /// last commit and ends. Returns once they all have. Does not close the log.
    pub async fn shutdown(&self) {
        self.inner.shutdown.send_replace(true);
        let committers = std::mem::take(&mut *self.inner.committers.lock());
        for committer in committers {
            // A commit task that panicked has nothing left to stop.
            let _ = committer.await;
        }
    }

    /// The log the broker stores everything in.
    pub fn log(&self) -> &Log {
        &self.inner.log
    }

    fn is_closed(&self) -> bool {
        self.inner.publisher_closed.load(Ordering::Acquire) || *self.inner.shutdown.borrow()
    }
}

#[async_trait]
impl Publisher for Broker {
    async fn publish(
        &self,
        topic: &TopicName,
        events: Vec<Event>,
    ) -> Result<Vec<Published>, Error> {
        if self.is_closed() {
            return Err(Error::Closed);
        }
        store::check_append(&events).map_err(|error| match error {
            store::Error::EmptyAppend => Error::EmptyPublish,
            store::Error::InvalidEvent { index, error } => Error::InvalidEvent { index, error },
            other => backend(other),
        })?;
        let info = self
            .inner
            .topic(topic, self.inner.options.partitions_default)
            .await?;
        let partitions = info.streams.len() as u32;
        let count = events.len();
        // Per partition: the indices of its events in the publish, and the events.
        let mut batches: BTreeMap<u32, (Vec<usize>, Vec<Event>)> = BTreeMap::new();
        for (index, event) in events.into_iter().enumerate() {
            let partition = partition_for(partition_key(&event), partitions);
            let batch = batches.entry(partition).or_default();
            batch.0.push(index);
            batch.1.push(event);
        }
        // The appends run concurrently, so the log's group commit syncs them together.
        let appends = batches.into_iter().map(|(partition, (indices, events))| {
            let log = &self.inner.log;
            let stream = &info.streams[partition as usize];
            async move {
                let appended = log.append(stream, ExpectedVersion::Any, events).await?;
                Ok::<_, store::Error>((partition, indices, appended))
            }
        });
        let appended = futures::future::try_join_all(appends)
            .await
            .map_err(backend)?;
        let mut published = vec![None; count];
        for (partition, indices, appended) in appended {
            assert_eq!(indices.len(), appended.events.len(), "one result per event");
            for (index, event) in indices.into_iter().zip(appended.events) {
                published[index] = Some(Published {
                    partition,
                    offset: event.version.0,
                });
            }
        }
        Ok(published
            .into_iter()
            .map(|published| published.expect("every event was appended"))
            .collect())
    }

    async fn close(&self) -> Result<(), Error> {
        self.inner.publisher_closed.store(true, Ordering::Release);
        Ok(())
    }
}

#[async_trait]
impl Subscriber for Broker {
    async fn subscribe(
        &self,
        topic: &TopicName,
        group: &GroupName,
    ) -> Result<Box<dyn herald_core::broker::Consumer>, Error> {
        if *self.inner.shutdown.borrow() {
            return Err(Error::Closed);
        }
        let info = self
            .inner
            .topic(topic, self.inner.options.partitions_default)
            .await?;
        let group = self.inner.group(topic, group, &info).await?;
        let member = self.inner.next_member.fetch_add(1, Ordering::Relaxed);
        let generation = group.generation.subscribe();
        group.join(member);
        Ok(Box::new(Consumer {
            member,
            group,
            log: self.inner.log.clone(),
            generation,
            shutdown: self.inner.shutdown.subscribe(),
            cursors: BTreeMap::new(),
            rotate: 0,
            left: false,
        }))
    }

    async fn lag(&self, topic: &TopicName, group: &GroupName) -> Result<Vec<PartitionLag>, Error> {
        let Some(info) = self.inner.existing_topic(topic).await? else {
            return Err(Error::UnknownTopic {
                topic: topic.clone(),
            });
        };
        // Committed offsets first, heads after: a commit covers only messages that exist,
        // so every head read afterwards is at or beyond its committed offset.
        let offsets = offsets_stream(group, topic)?;
        let committed = self
            .inner
            .durable_committed(topic, group, &info, &offsets)
            .await?;
        let heads = futures::future::try_join_all(
            info.streams
                .iter()
                .map(|stream| self.inner.log.stream_version(stream)),
        )
        .await
        .map_err(backend)?;
        committed
            .into_iter()
            .zip(heads)
            .zip(0u32..)
            .map(|((committed, last), partition)| {
                let head = last.map_or(0, |version| version.0 + 1);
                PartitionLag::new(partition, head, committed).ok_or_else(|| {
                    backend(InvalidRecord {
                        stream: offsets.clone(),
                        reason: format!(
                            "committed offset {committed} of partition {partition} is beyond \
                             its {head} messages"
                        ),
                    })
                })
            })
            .collect()
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            ordered_by_key: true,
            consumer_groups: true,
            persistent: true,
            redelivery: true,
        }
    }
}

#[async_trait]
impl herald_core::broker::Consumer for Consumer {
    async fn recv(&mut self) -> Option<Result<Message, Error>> {
        loop {
            if self.left {
                return None;
            }
            if *self.shutdown.borrow() {
                self.leave();
                return None;
            }
            if let Err(error) = self.reconcile().await {
                return Some(Err(error));
            }
            let (partition, item) = tokio::select! {
                biased;
                changed = self.shutdown.changed() => {
                    // Every broker handle was dropped: the same as a shutdown.
                    if changed.is_err() {
                        self.leave();
                        return None;
                    }
                    continue;
                }
                // The group's assignment changed: reconcile first.
                _ = self.generation.changed() => continue,
                next = poll_fn(|cx| poll_cursors(&mut self.cursors, &mut self.rotate, cx)) => next,
            };
            let Some(cursor) = self.cursors.get_mut(&partition) else {
                continue;
            };
            let recorded = match item {
                Ok(recorded) => recorded,
                Err(error) => {
                    // The log ends a subscription after an error; the next `recv`
                    // subscribes again from where this one stopped.
                    cursor.subscription = None;
                    return Some(Err(backend(error)));
                }
            };
            let offset = recorded.version.0;
            cursor.next = offset + 1;
            let owner = Owner {
                member: self.member,
                epoch: cursor.epoch,
            };
            let attempt = {
                let mut state = self.group.state.lock();
                let partition_state = &mut state.partitions[partition as usize];
                if partition_state.owner != Some(owner) {
                    // Revoked since: the next round reconciles.
                    continue;
                }
                if offset < partition_state.committed || partition_state.acked.contains(&offset) {
                    None
                } else {
                    let attempt = partition_state.attempts.entry(offset).or_insert(0);
                    *attempt += 1;
                    Some(*attempt)
                }
            };
            let Some(attempt) = attempt else {
                // Already acked (by this member before a nack, or by the previous owner).
                continue;
            };
            cursor.delivered_end = cursor.delivered_end.max(offset + 1);
            return Some(Ok(Message {
                topic: self.group.topic.clone(),
                partition,
                offset,
                attempt,
                event: recorded.event,
            }));
        }
    }

    async fn ack(&mut self, message: &Message) -> Result<(), Error> {
        let owner = self.holder(message)?;
        let advanced = {
            let mut state = self.group.state.lock();
            let partition = &mut state.partitions[message.partition as usize];
            if partition.owner != Some(owner) {
                return Err(not_held(message));
            }
            partition.ack(message.offset)
        };
        if advanced {
            self.group.commit_wake.notify_one();
        }
        Ok(())
    }

    async fn nack(&mut self, message: &Message) -> Result<(), Error> {
        let owner = self.holder(message)?;
        let committed = {
            let state = self.group.state.lock();
            let partition = &state.partitions[message.partition as usize];
            if partition.owner != Some(owner) {
                return Err(not_held(message));
            }
            partition.committed
        };
        if message.offset >= committed {
            let cursor = self
                .cursors
                .get_mut(&message.partition)
                .expect("holder checked the cursor");
            // Rewind, never forward: an earlier nack of this partition may have rewound
            // further already. The next `recv` subscribes from here again.
            if message.offset < cursor.next {
                cursor.next = message.offset;
                cursor.subscription = None;
            }
        }
        Ok(())
    }

    async fn close(mut self: Box<Self>) -> Result<(), Error> {
        self.leave();
        self.group.commit().await
    }
}

impl Consumer {
    /// This member's id within its broker.
    pub fn member_id(&self) -> u64 {
        self.member
    }

    /// The partitions this member currently reads, as of its last `recv`.
    pub fn partitions(&self) -> Vec<u32> {
        self.cursors.keys().copied().collect()
    }

    /// Brings the cursors in line with the group's assignment: drops the revoked
    /// partitions, starts the new ones at the committed offset, and (re)subscribes every
    /// cursor without a subscription (new, nacked, or ended by an error).
    async fn reconcile(&mut self) -> Result<(), Error> {
        let assigned: Vec<(u32, u64, u64)> = {
            let state = self.group.state.lock();
            state
                .partitions
                .iter()
                .zip(0u32..)
                .filter_map(|(partition, index)| match partition.owner {
                    Some(owner) if owner.member == self.member => {
                        Some((index, owner.epoch, partition.committed))
                    }
                    _ => None,
                })
                .collect()
        };
        self.cursors.retain(|partition, cursor| {
            assigned
                .iter()
                .any(|&(index, epoch, _)| index == *partition && epoch == cursor.epoch)
        });
        for (partition, epoch, committed) in assigned {
            self.cursors.entry(partition).or_insert(Cursor {
                epoch,
                next: committed,
                delivered_end: committed,
                subscription: None,
            });
        }
        for (partition, cursor) in &mut self.cursors {
            if cursor.subscription.is_none() {
                let stream = &self.group.partition_streams[*partition as usize];
                let subscription = self
                    .log
                    .subscribe_stream(stream, Version(cursor.next))
                    .await
                    .map_err(backend)?;
                cursor.subscription = Some(subscription);
            }
        }
        Ok(())
    }

    /// Checks that `message` was delivered to this member in its current hold of the
    /// partition; returns the hold.
    fn holder(&self, message: &Message) -> Result<Owner, Error> {
        if self.left {
            return Err(Error::Closed);
        }
        match self.cursors.get(&message.partition) {
            Some(cursor)
                if message.topic == self.group.topic && message.offset < cursor.delivered_end =>
            {
                Ok(Owner {
                    member: self.member,
                    epoch: cursor.epoch,
                })
            }
            _ => Err(not_held(message)),
        }
    }

    /// Leaves the group without waiting: the partitions are reassigned at once, and the
    /// group's commit task commits what this member acked.
    fn leave(&mut self) {
        if std::mem::replace(&mut self.left, true) {
            return;
        }
        self.cursors.clear();
        self.group.leave(self.member);
        self.group.commit_wake.notify_one();
    }
}

impl Drop for Consumer {
    fn drop(&mut self) {
        self.leave();
    }
}

/// Polls the partitions' subscriptions in turn, starting after the one that yielded last.
fn poll_cursors(
    cursors: &mut BTreeMap<u32, Cursor>,
    rotate: &mut usize,
    cx: &mut Context<'_>,
) -> Poll<(u32, Result<RecordedEvent, store::Error>)> {
    let partitions: Vec<u32> = cursors.keys().copied().collect();
    let count = partitions.len();
    for step in 0..count {
        let turn = (*rotate + step) % count;
        let partition = partitions[turn];
        let cursor = cursors.get_mut(&partition).expect("a key of the map");
        let Some(subscription) = cursor.subscription.as_mut() else {
            continue;
        };
        match subscription.poll_next_unpin(cx) {
            Poll::Ready(Some(item)) => {
                *rotate = turn + 1;
                return Poll::Ready((partition, item));
            }
            // The log was dropped; nothing more will come from this subscription.
            Poll::Ready(None) => cursor.subscription = None,
            Poll::Pending => {}
        }
    }
    Poll::Pending
}

/// State shared by the broker's handles.
struct Inner {
    log: Log,
    options: BrokerOptions,
    topics: Mutex<HashMap<TopicName, Arc<TopicInfo>>>,
    /// One cell per (topic, group): the first subscriber loads the group, the others wait.
    groups: Mutex<HashMap<(TopicName, GroupName), GroupCell>>,
    committers: Mutex<Vec<JoinHandle<()>>>,
    shutdown: watch::Sender<bool>,
    publisher_closed: AtomicBool,
    next_member: AtomicU64,
}

/// A group's coordinator once loaded; subscribers racing to load it wait for the first.
type GroupCell = Arc<OnceCell<Arc<Group>>>;

/// A topic as known to the broker.
struct TopicInfo {
    /// The stream of each partition, by partition.
    streams: Vec<StreamName>,
}

/// The coordinator of one consumer group on one topic.
struct Group {
    topic: TopicName,
    name: GroupName,
    partition_streams: Vec<StreamName>,
    offsets_stream: StreamName,
    state: Mutex<GroupState>,
    /// Bumped on every reassignment; members reconcile when it changes.
    generation: watch::Sender<u64>,
    /// Wakes the commit task.
    commit_wake: Notify,
    /// What the commit task has done.
    commits: watch::Sender<CommitStatus>,
}

struct GroupState {
    /// Member ids in join order.
    members: Vec<u64>,
    /// By partition.
    partitions: Vec<PartitionState>,
    /// Numbers holds: bumped whenever a partition gets a new owner.
    epoch: u64,
    /// Commits asked for with [`Group::commit`]; the commit task reports up to which one
    /// it has done.
    commit_requested: u64,
}

struct PartitionState {
    owner: Option<Owner>,
    /// The offset after the longest prefix of acked messages.
    committed: u64,
    /// The committed offset last written to the offsets stream.
    durable: u64,
    /// Acked offsets beyond `committed`.
    acked: BTreeSet<u64>,
    /// How many times `acked` gained an offset.
    acked_changes: u64,
    /// `acked_changes` as of the last snapshot written to the offsets stream.
    acked_durable_changes: u64,
    /// Deliveries per offset, for the offsets at or beyond `committed`.
    attempts: BTreeMap<u64, u32>,
}

/// Who holds a partition: a member, in one hold (`epoch`) of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Owner {
    member: u64,
    epoch: u64,
}

#[derive(Debug, Clone, Default)]
struct CommitStatus {
    /// The last commit request the task has served.
    done: u64,
    /// How its last append failed, if it did.
    error: Option<Arc<store::Error>>,
    /// The task has ended.
    stopped: bool,
}

/// One partition read by a member.
struct Cursor {
    epoch: u64,
    /// The offset the subscription continues at.
    next: u64,
    /// One past the highest offset delivered to this member in this hold.
    delivered_end: u64,
    subscription: Option<Subscription>,
}

/// The event holding a topic's partition count.
#[derive(serde::Serialize, serde::Deserialize)]
struct TopicRecord {
    topic: String,
    partitions: u32,
}

/// The event holding a snapshot of a group's committed offsets.
#[derive(serde::Serialize, serde::Deserialize)]
struct OffsetsRecord {
    topic: String,
    group: String,
    /// The committed offset of each partition, by partition.
    next: Vec<u64>,
    /// The offsets acked beyond `next`, by partition, as ranges `[start, end)`: acks behind
    /// a message still held (a parked key, a slow handler) that a restart must not lose.
    /// Absent when there are none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    acked: Vec<Vec<(u64, u64)>>,
}

/// What a group has committed in one partition, as read back from its offsets stream.
struct PartitionCommit {
    next: u64,
    acked: BTreeSet<u64>,
}

/// The most acked offsets beyond the committed ones a snapshot may hold in all: a bound
/// against a damaged record asking for an absurd amount of memory.
const ACKED_OFFSETS_MAX: u64 = 1 << 24;

const EVENT_SOURCE: &str = "/herald/broker";
const TOPIC_EVENT_TYPE: &str = "herald.broker.topic.created";
const OFFSETS_EVENT_TYPE: &str = "herald.broker.offsets.committed";

#[derive(Debug, thiserror::Error)]
#[error("a topic needs between 1 and {partitions_max} partitions, not {partitions}")]
struct InvalidPartitions {
    partitions: u32,
    partitions_max: u32,
}

#[derive(Debug, thiserror::Error)]
#[error("stored broker record in `{stream}` is invalid: {reason}")]
struct InvalidRecord {
    stream: StreamName,
    reason: String,
}

impl Inner {
    /// The topic, if it exists.
    async fn existing_topic(&self, topic: &TopicName) -> Result<Option<Arc<TopicInfo>>, Error> {
        if let Some(info) = self.topics.lock().get(topic) {
            return Ok(Some(info.clone()));
        }
        let stream = topics_stream(topic)?;
        match read_topic(&self.log, &stream).await? {
            Some(count) => self.known_topic(topic, count).map(Some),
            None => Ok(None),
        }
    }

    /// The topic, created with `partitions` partitions if it does not exist yet.
    async fn topic(&self, topic: &TopicName, partitions: u32) -> Result<Arc<TopicInfo>, Error> {
        if let Some(info) = self.topics.lock().get(topic) {
            return Ok(info.clone());
        }
        let stream = topics_stream(topic)?;
        let count = match read_topic(&self.log, &stream).await? {
            Some(count) => count,
            None => {
                let record = TopicRecord {
                    topic: topic.to_string(),
                    partitions,
                };
                let event = Event::new(EVENT_SOURCE, TOPIC_EVENT_TYPE)
                    .with_data(serde_json::to_value(&record).expect("serialisable"));
                match self
                    .log
                    .append(&stream, ExpectedVersion::NoStream, vec![event])
                    .await
                {
                    Ok(_) => partitions,
                    // Someone created it first: theirs counts. The log may report the
                    // conflict before the winning append is synced and readable, so wait
                    // for it to appear rather than read once.
                    Err(store::Error::WrongExpectedVersion { .. }) => {
                        wait_topic(&self.log, &stream).await?
                    }
                    Err(error) => return Err(backend(error)),
                }
            }
        };
        self.known_topic(topic, count)
    }

    /// Caches the topic, which exists with `count` partitions.
    fn known_topic(&self, topic: &TopicName, count: u32) -> Result<Arc<TopicInfo>, Error> {
        let streams = (0..count)
            .map(|partition| StreamName::system(format!("topic:{topic}:{partition}")))
            .collect::<Result<Vec<_>, _>>()
            .map_err(backend)?;
        let info = Arc::new(TopicInfo { streams });
        Ok(self
            .topics
            .lock()
            .entry(topic.clone())
            .or_insert(info)
            .clone())
    }

    /// The committed offsets of `group` on `topic` as last made durable: the coordinator's
    /// if the group is loaded, else the newest snapshot in `offsets`, its offsets stream.
    async fn durable_committed(
        &self,
        topic: &TopicName,
        group: &GroupName,
        info: &TopicInfo,
        offsets: &StreamName,
    ) -> Result<Vec<u64>, Error> {
        let loaded = self
            .groups
            .lock()
            .get(&(topic.clone(), group.clone()))
            .and_then(|cell| cell.get().cloned());
        if let Some(loaded) = loaded {
            let state = loaded.state.lock();
            return Ok(state.partitions.iter().map(|p| p.durable).collect());
        }
        let commits = read_committed(
            &self.log,
            offsets,
            topic,
            group,
            info.streams.len(),
            self.options.offsets_read_batch_len_max.max(1),
        )
        .await?;
        Ok(commits.into_iter().map(|commit| commit.next).collect())
    }

    /// The coordinator of `group` on `topic`, loaded (with its committed offsets) on first
    /// use.
    async fn group(
        &self,
        topic: &TopicName,
        group: &GroupName,
        info: &TopicInfo,
    ) -> Result<Arc<Group>, Error> {
        let cell = self
            .groups
            .lock()
            .entry((topic.clone(), group.clone()))
            .or_default()
            .clone();
        cell.get_or_try_init(|| self.load_group(topic, group, info))
            .await
            .cloned()
    }

    async fn load_group(
        &self,
        topic: &TopicName,
        name: &GroupName,
        info: &TopicInfo,
    ) -> Result<Arc<Group>, Error> {
        let offsets_stream = offsets_stream(name, topic)?;
        let commits = read_committed(
            &self.log,
            &offsets_stream,
            topic,
            name,
            info.streams.len(),
            self.options.offsets_read_batch_len_max.max(1),
        )
        .await?;
        let partitions = commits
            .into_iter()
            .map(|commit| PartitionState {
                owner: None,
                committed: commit.next,
                durable: commit.next,
                acked: commit.acked,
                acked_changes: 0,
                acked_durable_changes: 0,
                attempts: BTreeMap::new(),
            })
            .collect();
        let group = Arc::new(Group {
            topic: topic.clone(),
            name: name.clone(),
            partition_streams: info.streams.clone(),
            offsets_stream,
            state: Mutex::new(GroupState {
                members: Vec::new(),
                partitions,
                epoch: 0,
                commit_requested: 0,
            }),
            generation: watch::Sender::new(0),
            commit_wake: Notify::new(),
            commits: watch::Sender::new(CommitStatus::default()),
        });
        let span = tracing::info_span!("broker_committer", topic = %topic, group = %name);
        let committer = tokio::spawn(
            run_committer(group.clone(), self.log.clone(), self.shutdown.subscribe())
                .instrument(span),
        );
        self.committers.lock().push(committer);
        Ok(group)
    }
}

impl Group {
    fn join(&self, member: u64) {
        let mut state = self.state.lock();
        state.members.push(member);
        self.reassign(&mut state);
    }

    fn leave(&self, member: u64) {
        let mut state = self.state.lock();
        state.members.retain(|&other| other != member);
        self.reassign(&mut state);
    }

    /// The sticky [`broker::rebalance`] over the members in join order; a partition that
    /// keeps its owner keeps its hold (and so its member's cursor and acks).
    fn reassign(&self, state: &mut GroupState) {
        let GroupState {
            members,
            partitions,
            epoch,
            ..
        } = state;
        let mut owners: Vec<Option<u64>> = partitions
            .iter()
            .map(|partition| partition.owner.map(|owner| owner.member))
            .collect();
        broker::rebalance(&mut owners, members);
        for (partition, member) in partitions.iter_mut().zip(owners) {
            if partition.owner.map(|owner| owner.member) != member {
                partition.owner = member.map(|member| {
                    *epoch += 1;
                    Owner {
                        member,
                        epoch: *epoch,
                    }
                });
            }
        }
        self.generation.send_modify(|generation| *generation += 1);
    }

    /// Asks the commit task for a commit and waits until the offsets acked so far are
    /// durable.
    async fn commit(&self) -> Result<(), Error> {
        let request = {
            let mut state = self.state.lock();
            state.commit_requested += 1;
            state.commit_requested
        };
        let mut commits = self.commits.subscribe();
        self.commit_wake.notify_one();
        let status = commits
            .wait_for(|status| status.done >= request || status.stopped)
            .await
            .map(|status| status.clone())
            .unwrap_or_default();
        if status.done >= request {
            return match status.error {
                Some(error) => Err(backend(error)),
                None => Ok(()),
            };
        }
        // The broker was shut down; its last commit may already cover everything.
        let state = self.state.lock();
        if state.partitions.iter().all(|partition| {
            partition.durable == partition.committed
                && partition.acked_durable_changes == partition.acked_changes
        }) {
            Ok(())
        } else {
            Err(Error::Closed)
        }
    }

    /// Appends the committed offsets, and the acks beyond them, if they changed since the
    /// last append.
    async fn commit_once(&self, log: &Log) {
        let (request, snapshot) = {
            let state = self.state.lock();
            let moved = state.partitions.iter().any(|partition| {
                partition.committed != partition.durable
                    || partition.acked_changes != partition.acked_durable_changes
            });
            let snapshot = moved.then(|| {
                let next: Vec<u64> = state.partitions.iter().map(|p| p.committed).collect();
                let mut acked: Vec<Vec<(u64, u64)>> =
                    state.partitions.iter().map(|p| ranges(&p.acked)).collect();
                if acked.iter().all(Vec::is_empty) {
                    acked.clear();
                }
                let changes: Vec<u64> = state.partitions.iter().map(|p| p.acked_changes).collect();
                (next, acked, changes)
            });
            (state.commit_requested, snapshot)
        };
        let mut error = None;
        if let Some((next, acked, changes)) = snapshot {
            let record = OffsetsRecord {
                topic: self.topic.to_string(),
                group: self.name.to_string(),
                next,
                acked,
            };
            let event = Event::new(EVENT_SOURCE, OFFSETS_EVENT_TYPE)
                .with_data(serde_json::to_value(&record).expect("serialisable"));
            match log
                .append(&self.offsets_stream, ExpectedVersion::Any, vec![event])
                .await
            {
                Ok(_) => {
                    let mut state = self.state.lock();
                    for ((partition, next), changes) in
                        state.partitions.iter_mut().zip(record.next).zip(changes)
                    {
                        partition.durable = partition.durable.max(next);
                        partition.acked_durable_changes =
                            partition.acked_durable_changes.max(changes);
                    }
                }
                Err(failure) => {
                    tracing::warn!(error = %failure, "committing offsets failed");
                    error = Some(Arc::new(failure));
                }
            }
        }
        self.commits.send_modify(|status| {
            status.done = status.done.max(request);
            status.error = error;
        });
    }
}

impl PartitionState {
    /// Records an ack of `offset`; returns whether the committed offset moved.
    /// Records an ack of `offset`; returns whether there is something new to commit: the
    /// committed offset moved, or an ack beyond it must be kept too.
    fn ack(&mut self, offset: u64) -> bool {
        if offset < self.committed || !self.acked.insert(offset) {
            return false;
        }
        self.acked_changes += 1;
        let before = self.committed;
        while self.acked.remove(&self.committed) {
            self.committed += 1;
        }
        if self.committed != before {
            self.attempts = self.attempts.split_off(&self.committed);
        }
        true
    }
}

/// The commit task of one group: one append at a time, woken by acks, leaves and commit
/// requests; it makes a last commit and ends when the broker shuts down.
async fn run_committer(group: Arc<Group>, log: Log, mut shutdown: watch::Receiver<bool>) {
    loop {
        let stopping = tokio::select! {
            () = group.commit_wake.notified() => false,
            // Err: every broker handle is gone, which is a shutdown too.
            _ = shutdown.wait_for(|stopped| *stopped) => true,
        };
        group.commit_once(&log).await;
        if stopping {
            break;
        }
    }
    group.commits.send_modify(|status| status.stopped = true);
}

async fn read_topic(log: &Log, stream: &StreamName) -> Result<Option<u32>, Error> {
    let events = match log
        .read_stream(stream, Version::START, Direction::Forward, 1)
        .await
    {
        Ok(events) => events,
        Err(store::Error::StreamNotFound { .. }) => return Ok(None),
        Err(error) => return Err(backend(error)),
    };
    let Some(first) = events.first() else {
        return Ok(None);
    };
    let invalid = |reason: String| {
        backend(InvalidRecord {
            stream: stream.clone(),
            reason,
        })
    };
    let record: TopicRecord = first
        .event
        .data_as()
        .map_err(|error| invalid(error.to_string()))?
        .ok_or_else(|| invalid("no data".into()))?;
    if record.partitions == 0 {
        return Err(invalid("zero partitions".into()));
    }
    Ok(Some(record.partitions))
}

/// The partition count of a topic whose record another append is writing: waits (at most
/// [`TOPIC_VISIBLE_WAIT_MAX_MS`]) for the record to become readable.
async fn wait_topic(log: &Log, stream: &StreamName) -> Result<u32, Error> {
    let missing = || {
        backend(InvalidRecord {
            stream: stream.clone(),
            reason: "the topic exists but has no partition count".into(),
        })
    };
    let mut records = log
        .subscribe_stream(stream, Version::START)
        .await
        .map_err(backend)?;
    let wait = Duration::from_millis(TOPIC_VISIBLE_WAIT_MAX_MS);
    match tokio::time::timeout(wait, records.next()).await {
        Ok(Some(Ok(_))) => read_topic(log, stream).await?.ok_or_else(missing),
        Ok(Some(Err(error))) => Err(backend(error)),
        Ok(None) | Err(_) => Err(missing()),
    }
}

/// How long [`wait_topic`] waits for a topic record another append is writing.
const TOPIC_VISIBLE_WAIT_MAX_MS: u64 = 30_000;

/// The group's latest committed offsets: the newest snapshot of its own, read backward.
async fn read_committed(
    log: &Log,
    stream: &StreamName,
    topic: &TopicName,
    group: &GroupName,
    partitions: usize,
    batch_len: usize,
) -> Result<Vec<PartitionCommit>, Error> {
    let mut from = Version::END;
    loop {
        let page = match log
            .read_stream(stream, from, Direction::Backward, batch_len)
            .await
        {
            Ok(page) => page,
            Err(store::Error::StreamNotFound { .. } | store::Error::StreamDeleted { .. }) => {
                Vec::new()
            }
            Err(error) => return Err(backend(error)),
        };
        for recorded in &page {
            let Ok(Some(record)) = recorded.event.data_as::<OffsetsRecord>() else {
                continue;
            };
            if record.topic == topic.as_str() && record.group == group.as_str() {
                if record.next.len() != partitions {
                    return Err(backend(InvalidRecord {
                        stream: stream.clone(),
                        reason: format!(
                            "{} committed offsets for a topic of {partitions} partitions",
                            record.next.len()
                        ),
                    }));
                }
                return partition_commits(record, partitions).map_err(|reason| {
                    backend(InvalidRecord {
                        stream: stream.clone(),
                        reason,
                    })
                });
            }
        }
        match page.last() {
            Some(last) if last.version.0 > 0 => from = Version(last.version.0 - 1),
            _ => {
                return Ok((0..partitions)
                    .map(|_| PartitionCommit {
                        next: 0,
                        acked: BTreeSet::new(),
                    })
                    .collect());
            }
        }
    }
}

/// The commits of a snapshot, checked: the acked ranges lie beyond their partition's
/// committed offset, are not empty, and hold at most [`ACKED_OFFSETS_MAX`] offsets in all.
fn partition_commits(
    record: OffsetsRecord,
    partitions: usize,
) -> Result<Vec<PartitionCommit>, String> {
    if !record.acked.is_empty() && record.acked.len() != partitions {
        return Err(format!(
            "acked offsets of {} partitions for a topic of {partitions} partitions",
            record.acked.len()
        ));
    }
    let mut acked_ranges = record.acked.into_iter();
    let mut total = 0u64;
    let mut commits = Vec::with_capacity(partitions);
    for next in record.next {
        let mut acked = BTreeSet::new();
        for (start, end) in acked_ranges.next().unwrap_or_default() {
            if start <= next || start >= end {
                return Err(format!(
                    "acked range [{start}, {end}) is empty or not beyond the committed offset {next}"
                ));
            }
            total += end - start;
            if total > ACKED_OFFSETS_MAX {
                return Err(format!("more than {ACKED_OFFSETS_MAX} acked offsets"));
            }
            acked.extend(start..end);
        }
        commits.push(PartitionCommit { next, acked });
    }
    Ok(commits)
}

/// `offsets` as ranges `[start, end)` of consecutive offsets, in order.
fn ranges(offsets: &BTreeSet<u64>) -> Vec<(u64, u64)> {
    let mut ranges: Vec<(u64, u64)> = Vec::new();
    for &offset in offsets {
        match ranges.last_mut() {
            Some((_, end)) if *end == offset => *end += 1,
            _ => ranges.push((offset, offset + 1)),
        }
    }
    ranges
}

/// `$topics:<topic>`: the stream holding the topic's partition count.
fn topics_stream(topic: &TopicName) -> Result<StreamName, Error> {
    StreamName::system(format!("topics:{topic}")).map_err(backend)
}

/// `$offsets:<group>:<topic>`: the stream of the group's committed offsets on the topic.
fn offsets_stream(group: &GroupName, topic: &TopicName) -> Result<StreamName, Error> {
    StreamName::system(format!("offsets:{group}:{topic}")).map_err(backend)
}

fn backend(error: impl std::error::Error + Send + Sync + 'static) -> Error {
    Error::Backend(Box::new(error))
}

fn not_held(message: &Message) -> Error {
    Error::NotHeld {
        topic: message.topic.clone(),
        partition: message.partition,
        offset: message.offset,
    }
}
