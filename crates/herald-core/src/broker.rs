//! Publish / subscribe: topics split into partitions by key, consumer groups, ack and nack.
//!
//! # Contract
//!
//! Every broker backend MUST keep these promises; the Pub/Sub conformance suite
//! (`herald_core::pubsub_conformance`, feature `test-util`) checks them, case by case, for
//! the [`Capabilities`] the backend declares.
//!
//! - **Partitioning.** A topic has a fixed number of partitions. An event goes to partition
//!   `partition_for(key, partitions)` where `key` is its `partitionkey` extension, or its id
//!   when it has none. Offsets within a partition start at 0 and are contiguous.
//! - **Publish.** When [`Publisher::publish`] returns `Ok`, the events are stored per the
//!   backend's documented durability (the embedded broker: synced to disk), in the order
//!   given within each partition. A publish of several events is atomic per partition at
//!   least; backends SHOULD make it atomic as a whole and document whether they do. A
//!   publish that fails with [`Error::EmptyPublish`] or [`Error::InvalidEvent`] MUST store
//!   nothing.
//! - **Order per key.** A consumer receives the messages of a partition in offset order. Two
//!   events with the same key are therefore received in the order they were published.
//! - **Consumer groups.** Every group receives every message of the topic; within a group,
//!   each partition is assigned to exactly one member at a time. When a member joins or
//!   leaves (or its consumer is dropped), the partitions are reassigned among the members
//!   (rebalance); a member stops receiving messages of a partition taken from it. A member
//!   has joined when [`Subscriber::subscribe`] returns: the rebalance is done, so every
//!   message published afterwards goes to the members of the new assignment only. While a
//!   group has no more members than the topic has partitions, every member MUST be assigned
//!   at least one partition.
//! - **Ack.** [`Consumer::ack`] records that the group is done with a message. The group's
//!   committed offset of a partition is the offset after the longest prefix of acked
//!   messages; it MUST be durable before the backend reports it (e.g. in lag), and a group
//!   resumes from it after a restart or a rebalance. Messages below the committed offset
//!   MUST NOT be delivered to the group again; acked messages above it MAY be (delivery is
//!   at least once).
//! - **Redelivery.** Messages not acked when their consumer closes, is dropped, or its
//!   process crashes MUST be delivered again (at least once). [`Consumer::nack`] rewinds the
//!   message's partition for this member: the message and every later message of that
//!   partition not yet acked are delivered again, in order, with `attempt` increased. Each
//!   redelivery of a message to a group MUST carry a greater `attempt` than the delivery
//!   before it (across a restart, backends SHOULD keep counting; the suite does not check).
//! - **Close.** After [`Consumer::close`] returns, the member has left its group. After
//!   [`Publisher::close`] returns, every publish that returned `Ok` is durable, and later
//!   publishes MUST fail with [`Error::Closed`].

use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;

use crate::event::{self, Event};
use crate::stream::InvalidStreamName;

/// The name of a topic: the same rules as a [`StreamName`](crate::StreamName).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TopicName(Arc<str>);

/// The name of a consumer group: the same rules as a [`StreamName`](crate::StreamName).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct GroupName(Arc<str>);

macro_rules! name_type {
    ($name:ident) => {
        impl $name {
            /// Validates `name` (see [`StreamName::new`](crate::StreamName::new)).
            pub fn new(name: impl AsRef<str>) -> Result<Self, InvalidStreamName> {
                crate::StreamName::new(name.as_ref())?;
                Ok($name(Arc::from(name.as_ref())))
            }

            /// The name as a string.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Debug::fmt(&*self.0, f)
            }
        }
    };
}

name_type!(TopicName);
name_type!(GroupName);

/// The partition an event with partition key `key` belongs to among `partitions`
/// (FNV-1a 64 of the key's bytes, modulo the count): stable across processes, builds and
/// backends, so every backend puts a key in the same partition.
pub fn partition_for(key: &str, partitions: u32) -> u32 {
    assert!(partitions > 0, "a topic has at least one partition");
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in key.as_bytes() {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    (hash % u64::from(partitions)) as u32
}

/// The key an event is partitioned by: its `partitionkey` extension, else its id.
pub fn partition_key(event: &Event) -> &str {
    event.partition_key().unwrap_or(&event.id)
}

/// Where a published event was stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Published {
    /// Its partition.
    pub partition: u32,
    /// Its offset within the partition.
    pub offset: u64,
}

/// A message as delivered to a consumer.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    /// The topic it was published to.
    pub topic: TopicName,
    /// Its partition.
    pub partition: u32,
    /// Its offset within the partition.
    pub offset: u64,
    /// 1 for the first delivery to this group, then one more for each redelivery.
    pub attempt: u32,
    /// The event, exactly as published.
    pub event: Event,
}

/// What a backend can do, so the conformance suite checks what it promises and no more.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capabilities {
    /// Messages with the same key arrive in publish order.
    pub ordered_by_key: bool,
    /// Several members of a group share the partitions.
    pub consumer_groups: bool,
    /// Published messages and committed offsets survive a restart of the broker.
    pub persistent: bool,
    /// Un-acked and nacked messages are delivered again.
    pub redelivery: bool,
}

/// Why a broker operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An event of the publish is not a valid CloudEvent.
    #[error("event {index} of the publish is invalid: {error}")]
    InvalidEvent {
        /// 0-based index of the event.
        index: usize,
        /// What is wrong with it.
        error: event::Error,
    },
    /// A publish carried no events.
    #[error("a publish needs at least one event")]
    EmptyPublish,
    /// The topic does not exist and the backend does not create topics on first use.
    #[error("topic `{topic}` does not exist")]
    UnknownTopic {
        /// The topic.
        topic: TopicName,
    },
    /// The message was not delivered to this consumer, or its partition has been
    /// reassigned since.
    #[error("message {topic}/{partition}@{offset} is not held by this consumer")]
    NotHeld {
        /// Its topic.
        topic: TopicName,
        /// Its partition.
        partition: u32,
        /// Its offset.
        offset: u64,
    },
    /// The publisher, subscriber or consumer has been closed.
    #[error("closed")]
    Closed,
    /// A backend-specific failure.
    #[error("backend failure")]
    Backend(#[source] Box<dyn std::error::Error + Send + Sync>),
}

/// Publishes events to topics.
///
/// Object-safe: the runtime holds `Arc<dyn Publisher>`. See the
/// [module documentation](self) for the contract.
#[async_trait]
pub trait Publisher: Send + Sync + 'static {
    /// Publishes `events` to `topic`, each to the partition of its key; returns where each
    /// was stored, in the order given.
    async fn publish(&self, topic: &TopicName, events: Vec<Event>)
    -> Result<Vec<Published>, Error>;

    /// Stops accepting publishes once the ones in flight are durable.
    async fn close(&self) -> Result<(), Error>;
}

/// Joins consumer groups.
///
/// Object-safe: the runtime holds `Arc<dyn Subscriber>`.
#[async_trait]
pub trait Subscriber: Send + Sync + 'static {
    /// Joins `group` on `topic` as a new member; the group starts at the beginning of the
    /// topic the first time it is used, and at its committed offsets afterwards. Returns
    /// once the member has joined and the group's partitions have been reassigned.
    async fn subscribe(
        &self,
        topic: &TopicName,
        group: &GroupName,
    ) -> Result<Box<dyn Consumer>, Error>;

    /// What this backend promises.
    fn capabilities(&self) -> Capabilities;
}

/// One member of a consumer group. Dropping it leaves the group as [`Consumer::close`]
/// does, without waiting.
#[async_trait]
pub trait Consumer: Send + 'static {
    /// The next message of the partitions assigned to this member; waits for one.
    /// `None` once the broker has shut down (or the member can receive nothing more).
    async fn recv(&mut self) -> Option<Result<Message, Error>>;

    /// Marks `message` processed by the group.
    async fn ack(&mut self, message: &Message) -> Result<(), Error>;

    /// Asks for `message` (and the later un-acked messages of its partition) again.
    async fn nack(&mut self, message: &Message) -> Result<(), Error>;

    /// Leaves the group: commits what was acked and hands the partitions to the other
    /// members, which receive the un-acked messages again.
    async fn close(self: Box<Self>) -> Result<(), Error>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partitions_are_stable_and_in_range() {
        assert_eq!(partition_for("order-1", 1), 0);
        let first = partition_for("order-1", 16);
        assert!(first < 16);
        assert_eq!(partition_for("order-1", 16), first, "stable");
        let spread: std::collections::HashSet<u32> = (0..200)
            .map(|n| partition_for(&format!("key-{n}"), 8))
            .collect();
        assert_eq!(spread.len(), 8, "keys spread over every partition");
    }

    // Keeps the traits object-safe: this stops compiling if one ever isn't.
    #[allow(dead_code)]
    fn object_safe(
        publisher: Arc<dyn Publisher>,
        subscriber: Arc<dyn Subscriber>,
        consumer: Box<dyn Consumer>,
    ) -> (Arc<dyn Publisher>, Arc<dyn Subscriber>, Box<dyn Consumer>) {
        (publisher, subscriber, consumer)
    }
}
