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
//! - **Sticky assignment.** A rebalance moves as few partitions as it can, so that the
//!   members that stay keep acking what they hold. When a member leaves, only its
//!   partitions MUST move: the members that stay MUST keep every partition they held, and
//!   their acks and nacks of messages delivered before the leave MUST succeed; the
//!   leaver's partitions SHOULD go to the members holding the fewest. When a member joins,
//!   it SHOULD take partitions only from the members holding the most, until no member
//!   holds two partitions more than another; a member SHOULD keep every partition it is not
//!   required to give up. [`rebalance`] is such an assignment; backends with an in-process
//!   coordinator use it.
//! - **Ack.** [`Consumer::ack`] records that the group is done with a message. The group's
//!   committed offset of a partition is the offset after the longest prefix of acked
//!   messages; it MUST be durable before the backend reports it (e.g. in lag), and a group
//!   resumes from it after a restart or a rebalance. Messages below the committed offset
//!   MUST NOT be delivered to the group again; acked messages above it MAY be (delivery is
//!   at least once).
//! - **Lag.** [`Subscriber::lag`] reports, for every partition of a topic in partition
//!   order, its head (the offset after its last message), the group's committed offset, and
//!   their difference. The committed offset reported MUST be durable (acks recorded only in
//!   memory do not count), and MUST be 0 for a group that never committed, whether or not
//!   it exists. A topic that does not exist MUST fail with [`Error::UnknownTopic`]; asking
//!   MUST NOT create the topic or the group.
//! - **Redelivery.** Messages not acked when their consumer closes, is dropped, or its
//!   process crashes MUST be delivered again (at least once). [`Consumer::nack`] rewinds the
//!   message's partition for this member: the message and every later message of that
//!   partition not yet acked are delivered again, in order, with `attempt` increased. Each
//!   redelivery of a message to a group MUST carry a greater `attempt` than the delivery
//!   before it (across a restart, backends SHOULD keep counting; the suite does not check).
//! - **Cancel-safe receive.** [`Consumer::recv`] MUST be cancel-safe: if its future is
//!   dropped before it completes, no message is lost — it is returned by a later `recv` of
//!   the same consumer, in its place in the partition's order. A consumer can therefore
//!   wait for a message and for something else (an ack to apply, a shutdown) in one
//!   `select!`.
//! - **Close.** After [`Consumer::close`] returns, the member has left its group. After
//!   [`Publisher::close`] returns, every publish that returned `Ok` is durable, and later
//!   publishes MUST fail with [`Error::Closed`].
//!
//! # Names
//!
//! Topic and group names follow the rules of stream names (see
//! [`StreamName::new`](crate::StreamName::new)) and, on top of them, never contain `:`.
//! Backends build the names of their own streams, keys or subjects from topic and group
//! names with `:` as the separator (the embedded broker keeps a group's offsets in
//! `$offsets:<group>:<topic>`), and a name without `:` keeps those unambiguous.

use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;

use crate::event::{self, Event};
use crate::stream::InvalidStreamName;

/// The name of a topic: the rules of a [`StreamName`](crate::StreamName), without `:` (see
/// [Names](self#names)).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TopicName(Arc<str>);

/// The name of a consumer group: the rules of a [`StreamName`](crate::StreamName), without
/// `:` (see [Names](self#names)).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct GroupName(Arc<str>);

macro_rules! name_type {
    ($name:ident) => {
        impl $name {
            /// Validates `name`: the rules of [`StreamName::new`](crate::StreamName::new),
            /// and no `:` (the separator of the names backends build from it).
            pub fn new(name: impl AsRef<str>) -> Result<Self, InvalidStreamName> {
                let name = name.as_ref();
                crate::StreamName::new(name)?;
                if name.contains(':') {
                    return Err(InvalidStreamName {
                        name: name.to_owned(),
                        reason: "`:` is not allowed in topic and group names",
                    });
                }
                Ok($name(Arc::from(name)))
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

        impl std::str::FromStr for $name {
            type Err = InvalidStreamName;
            fn from_str(name: &str) -> Result<Self, Self::Err> {
                $name::new(name)
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

/// Reassigns `owners` (the member holding each partition, by partition) to `members`
/// (distinct, in join order), moving as few partitions as it can: the sticky assignment of
/// the [contract](self#contract).
///
/// - Partitions of members no longer in `members` are free; every partition is assigned
///   once `members` is not empty, and none is when it is.
/// - The result is balanced: each member holds `partitions / members` partitions, or one
///   more. The members allowed one more are those that already hold the most (the earliest
///   joined among equals), so that, from a balanced assignment, a leave never takes a
///   partition from a member that stays.
/// - A member holding more than its share gives up its highest partitions; free partitions
///   go, lowest first, to the member holding the fewest (the earliest joined among equals).
///
/// So when a member leaves, only its partitions move, to the members holding the fewest;
/// when one joins, it takes partitions from the members holding the most until the group is
/// balanced. Deterministic: the same owners and members always give the same assignment.
pub fn rebalance<M: Copy + Eq>(owners: &mut [Option<M>], members: &[M]) {
    let member_index = |member: M| members.iter().position(|&other| other == member);
    for owner in owners.iter_mut() {
        if owner.is_some_and(|member| member_index(member).is_none()) {
            *owner = None;
        }
    }
    if members.is_empty() {
        return;
    }
    let mut held = vec![0_usize; members.len()];
    for member in owners.iter().flatten() {
        held[member_index(*member).expect("owners left are members")] += 1;
    }
    let share = owners.len() / members.len();
    let mut share_of = vec![share; members.len()];
    let mut by_holding: Vec<usize> = (0..members.len()).collect();
    by_holding.sort_by_key(|&index| (std::cmp::Reverse(held[index]), index));
    for &index in by_holding.iter().take(owners.len() % members.len()) {
        share_of[index] += 1;
    }
    for owner in owners.iter_mut().rev() {
        if let Some(member) = *owner {
            let index = member_index(member).expect("owners left are members");
            if held[index] > share_of[index] {
                *owner = None;
                held[index] -= 1;
            }
        }
    }
    for owner in owners.iter_mut().filter(|owner| owner.is_none()) {
        let index = (0..members.len())
            .filter(|&index| held[index] < share_of[index])
            .min_by_key(|&index| (held[index], index))
            .expect("the shares add up to the partition count");
        *owner = Some(members[index]);
        held[index] += 1;
    }
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

/// A consumer group's progress in one partition of a topic, as [`Subscriber::lag`] reports
/// it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PartitionLag {
    /// The partition.
    pub partition: u32,
    /// The offset after the partition's last message: its message count.
    pub head: u64,
    /// The group's durable committed offset: every message below it is done with.
    pub committed: u64,
    /// `head - committed`: the messages the group has yet to commit.
    pub lag: u64,
}

impl PartitionLag {
    /// The progress of a partition of `head` messages whose committed offset is
    /// `committed`; `None` if `committed` is beyond the head, which a backend reads only
    /// from damaged storage.
    pub fn new(partition: u32, head: u64, committed: u64) -> Option<Self> {
        Some(PartitionLag {
            partition,
            head,
            committed,
            lag: head.checked_sub(committed)?,
        })
    }
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

/// Joins consumer groups, and tells how far behind they are.
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

    /// The progress of `group` in every partition of `topic`, in partition order: head,
    /// durable committed offset and lag. A group that never committed has committed 0.
    /// Fails with [`Error::UnknownTopic`] if the topic does not exist; creates nothing.
    async fn lag(&self, topic: &TopicName, group: &GroupName) -> Result<Vec<PartitionLag>, Error>;

    /// What this backend promises.
    fn capabilities(&self) -> Capabilities;
}

/// One member of a consumer group. Dropping it leaves the group as [`Consumer::close`]
/// does, without waiting.
#[async_trait]
pub trait Consumer: Send + 'static {
    /// The next message of the partitions assigned to this member; waits for one.
    /// `None` once the broker has shut down (or the member can receive nothing more).
    ///
    /// Cancel-safe (a MUST of the [contract](self#contract)): dropping the future before it
    /// completes loses no message; a later `recv` returns it.
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

    #[test]
    fn topic_and_group_names_are_stream_names_without_colons() {
        for good in ["orders", "order-events.v2", "tenant_a@eu", "x"] {
            assert_eq!(TopicName::new(good).unwrap().as_str(), good);
            assert_eq!(GroupName::new(good).unwrap().as_str(), good);
            assert_eq!(
                good.parse::<TopicName>().unwrap(),
                TopicName::new(good).unwrap()
            );
        }
        for bad in ["a:b", ":orders", "orders:", "tenant:a@b.c_d"] {
            let error = TopicName::new(bad).unwrap_err();
            assert_eq!(error.name, bad);
            assert!(error.reason.contains("`:`"), "{error}");
            assert!(GroupName::new(bad).is_err(), "{bad:?} must be rejected");
        }
        // The stream-name rules still hold.
        let long = "x".repeat(257);
        for bad in ["", "$orders", "a/b", "a b", "é", ".", "..", long.as_str()] {
            assert!(TopicName::new(bad).is_err(), "{bad:?} must be rejected");
            assert!(
                bad.parse::<GroupName>().is_err(),
                "{bad:?} must be rejected"
            );
        }
    }

    /// The partitions each member holds.
    fn holdings(owners: &[Option<u64>], members: &[u64]) -> Vec<usize> {
        members
            .iter()
            .map(|member| owners.iter().filter(|o| **o == Some(*member)).count())
            .collect()
    }

    #[test]
    fn rebalance_from_scratch_splits_in_blocks() {
        let mut owners = vec![None; 8];
        rebalance(&mut owners, &[1]);
        assert_eq!(owners, [Some(1); 8]);
        rebalance(&mut owners, &[1, 2]);
        let [a, b] = [Some(1), Some(2)];
        assert_eq!(owners, [a, a, a, a, b, b, b, b]);
        rebalance(&mut owners, &[1, 2, 3]);
        let c = Some(3);
        assert_eq!(owners, [a, a, a, c, b, b, b, c]);
        // 1 leaves: only its partitions move, to the members holding the fewest.
        rebalance(&mut owners, &[2, 3]);
        assert_eq!(owners, [c, b, c, c, b, b, b, c]);
        rebalance(&mut owners, &[]);
        assert_eq!(owners, [None; 8]);
    }

    #[test]
    fn rebalance_with_more_members_than_partitions_moves_nothing_on_join() {
        let mut owners = vec![None; 2];
        for members in [&[1][..], &[1, 2], &[1, 2, 3], &[1, 2, 3, 4]] {
            rebalance(&mut owners, members);
        }
        assert_eq!(owners, [Some(1), Some(2)]);
        // 1 leaves: its partition goes to the earliest member holding none.
        rebalance(&mut owners, &[2, 3, 4]);
        assert_eq!(owners, [Some(3), Some(2)]);
    }

    proptest::proptest! {
        /// Joins and leaves in any order keep the assignment complete and balanced; a leave
        /// moves only the leaver's partitions, and a join moves partitions only to the
        /// newcomer, no more than its share.
        #[test]
        fn rebalance_is_balanced_and_sticky(
            partitions in 1_usize..12,
            steps in proptest::collection::vec((proptest::bool::ANY, 0_usize..8), 1..40),
        ) {
            let mut owners: Vec<Option<u64>> = vec![None; partitions];
            let mut members: Vec<u64> = Vec::new();
            let mut next_member = 0_u64;
            for (join, pick) in steps {
                let before = owners.clone();
                let left = if join || members.is_empty() {
                    members.push(next_member);
                    next_member += 1;
                    None
                } else {
                    Some(members.remove(pick % members.len()))
                };
                rebalance(&mut owners, &members);

                if members.is_empty() {
                    proptest::prop_assert!(owners.iter().all(Option::is_none));
                    continue;
                }
                proptest::prop_assert!(owners.iter().all(|o| o.is_some_and(|m| members.contains(&m))));
                let held = holdings(&owners, &members);
                let (most, fewest) = (*held.iter().max().unwrap(), *held.iter().min().unwrap());
                proptest::prop_assert!(most - fewest <= 1, "unbalanced: {held:?}");
                if members.len() <= partitions {
                    proptest::prop_assert!(fewest >= 1, "a member without a partition: {held:?}");
                }
                for (was, now) in before.iter().zip(&owners) {
                    match left {
                        // Only the leaver's partitions move.
                        Some(leaver) if *was != Some(leaver) => proptest::prop_assert_eq!(was, now),
                        Some(_) => {}
                        // A partition moves only to the newcomer.
                        None if was != now => proptest::prop_assert_eq!(*now, members.last().copied()),
                        None => {}
                    }
                }
            }
        }
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
