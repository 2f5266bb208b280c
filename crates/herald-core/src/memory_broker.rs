//! [`InMemoryBroker`]: a simple, correct broker that keeps everything in memory.
//!
//! It is the reference implementation of the [broker contract](crate::broker) and a fast
//! fake for unit tests of the components built on [`Publisher`], [`Subscriber`] and
//! [`Consumer`]. It passes the [Pub/Sub conformance suite](mod@crate::pubsub_conformance)
//! with the capabilities `ordered_by_key`, `consumer_groups` and `redelivery`. It is not
//! persistent: everything is lost when the last handle is dropped, and nothing bounds its
//! memory.
//!
//! One mutex guards the whole state, so a publish is trivially atomic as a whole. Topics are
//! created on first use (publish or subscribe) with the broker's partition count. Within a
//! group, every join and leave reassigns the partitions with the sticky
//! [`broker::rebalance`]: a leave moves only the leaver's partitions, a join takes
//! partitions only from the members holding the most. A partition that changes owner
//! restarts at the group's committed offset, so its un-acked messages are delivered again.
//! Acks commit at once (memory is all the durability this broker has), so
//! [`Subscriber::lag`] reports every ack of the acked prefix.
//!
//! `recv` is cancel-safe because it takes a message from the state and returns it in one
//! step under the lock; its only await point is the wait for a change, where it holds
//! nothing. Waiting consumers are woken through a [`tokio::sync::watch`] channel that
//! carries a change counter.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use async_trait::async_trait;
use parking_lot::Mutex;
use tokio::sync::watch;

use crate::broker::{
    self, Capabilities, Consumer, Error, GroupName, Message, PartitionLag, Published, Publisher,
    Subscriber, TopicName,
};
use crate::event::Event;

/// A broker kept in memory; see the [module documentation](self).
///
/// Cloning is cheap and gives another handle to the same broker. [`Publisher::close`]
/// stops publishes through every handle; consumers keep receiving what was published.
#[derive(Clone)]
pub struct InMemoryBroker {
    shared: Arc<Shared>,
}

struct Shared {
    state: Mutex<State>,
    /// Bumped after every change a waiting consumer may care about (a publish, a
    /// rebalance, a nack).
    changes: watch::Sender<u64>,
    /// The partition count of every topic.
    partitions: u32,
}

#[derive(Default)]
struct State {
    topics: HashMap<TopicName, Topic>,
    /// The id the next member gets; ids rise with join order.
    member_id_next: u64,
    /// Publishes are refused once set.
    publisher_closed: bool,
}

struct Topic {
    /// The events of each partition; the index in the inner vector is the offset.
    partitions: Vec<Vec<Event>>,
    groups: HashMap<GroupName, Group>,
}

struct Group {
    /// Member ids in join order.
    members: Vec<u64>,
    /// One entry per partition of the topic.
    partitions: Vec<GroupPartition>,
}

/// A group's progress in one partition.
#[derive(Default)]
struct GroupPartition {
    /// The member the partition is assigned to.
    owner: Option<u64>,
    /// The offset after the longest prefix of acked messages.
    committed: u64,
    /// Acked offsets at or above `committed`.
    acked: BTreeSet<u64>,
    /// The next offset to deliver to the owner, unless acked; it may fall behind
    /// `committed` when out-of-order acks fill the gap after it.
    cursor: u64,
    /// How often each offset at or above `committed` has been delivered to the group.
    deliveries: BTreeMap<u64, u32>,
}

/// One member of a group; leaves the group when closed or dropped.
struct Member {
    shared: Arc<Shared>,
    topic: TopicName,
    group: GroupName,
    id: u64,
    changes: watch::Receiver<u64>,
    /// Which partition to look at first, so that no partition starves the others.
    partition_next: u32,
    left: bool,
}

impl InMemoryBroker {
    /// An empty broker whose topics have `partitions` partitions.
    ///
    /// # Panics
    ///
    /// If `partitions` is 0: a topic has at least one partition.
    pub fn new(partitions: u32) -> Self {
        assert!(partitions > 0, "a topic has at least one partition");
        InMemoryBroker {
            shared: Arc::new(Shared {
                state: Mutex::new(State::default()),
                changes: watch::Sender::new(0),
                partitions,
            }),
        }
    }

    /// The partition count of every topic.
    pub fn partitions(&self) -> u32 {
        self.shared.partitions
    }
}

impl std::fmt::Debug for InMemoryBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = self.shared.state.lock();
        f.debug_struct("InMemoryBroker")
            .field("partitions", &self.shared.partitions)
            .field("topics", &state.topics.len())
            .field("publisher_closed", &state.publisher_closed)
            .finish()
    }
}

#[async_trait]
impl Publisher for InMemoryBroker {
    async fn publish(
        &self,
        topic: &TopicName,
        events: Vec<Event>,
    ) -> Result<Vec<Published>, Error> {
        if events.is_empty() {
            return Err(Error::EmptyPublish);
        }
        for (index, event) in events.iter().enumerate() {
            event
                .validate()
                .map_err(|error| Error::InvalidEvent { index, error })?;
        }
        let partitions = self.shared.partitions;
        let published = {
            let mut state = self.shared.state.lock();
            if state.publisher_closed {
                return Err(Error::Closed);
            }
            let topic = state.topic(topic, partitions);
            events
                .into_iter()
                .map(|event| {
                    let partition =
                        broker::partition_for(broker::partition_key(&event), partitions);
                    let log = &mut topic.partitions[partition as usize];
                    log.push(event);
                    Published {
                        partition,
                        offset: log.len() as u64 - 1,
                    }
                })
                .collect()
        };
        self.shared.changed();
        Ok(published)
    }

    async fn close(&self) -> Result<(), Error> {
        self.shared.state.lock().publisher_closed = true;
        Ok(())
    }
}

#[async_trait]
impl Subscriber for InMemoryBroker {
    async fn subscribe(
        &self,
        topic: &TopicName,
        group: &GroupName,
    ) -> Result<Box<dyn Consumer>, Error> {
        let partitions = self.shared.partitions;
        // Subscribe to changes before joining, so that no change after the join is missed.
        let changes = self.shared.changes.subscribe();
        let id = {
            let mut state = self.shared.state.lock();
            let id = state.member_id_next;
            state.member_id_next += 1;
            let group = state
                .topic(topic, partitions)
                .groups
                .entry(group.clone())
                .or_insert_with(|| Group {
                    members: Vec::new(),
                    partitions: (0..partitions).map(|_| GroupPartition::default()).collect(),
                });
            group.members.push(id);
            group.rebalance();
            id
        };
        self.shared.changed();
        Ok(Box::new(Member {
            shared: Arc::clone(&self.shared),
            topic: topic.clone(),
            group: group.clone(),
            id,
            changes,
            partition_next: 0,
            left: false,
        }))
    }

    async fn lag(&self, topic: &TopicName, group: &GroupName) -> Result<Vec<PartitionLag>, Error> {
        let state = self.shared.state.lock();
        let Some(topic_state) = state.topics.get(topic) else {
            return Err(Error::UnknownTopic {
                topic: topic.clone(),
            });
        };
        let group = topic_state.groups.get(group);
        Ok(topic_state
            .partitions
            .iter()
            .zip(0u32..)
            .map(|(log, partition)| {
                let committed =
                    group.map_or(0, |group| group.partitions[partition as usize].committed);
                PartitionLag::new(partition, log.len() as u64, committed)
                    .expect("a group commits only messages that exist")
            })
            .collect())
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            ordered_by_key: true,
            consumer_groups: true,
            persistent: false,
            redelivery: true,
        }
    }
}

#[async_trait]
impl Consumer for Member {
    async fn recv(&mut self) -> Option<Result<Message, Error>> {
        loop {
            // Marking the current change as seen before looking at the state means that
            // any change made after the look wakes the wait below: no lost wake-up.
            self.changes.borrow_and_update();
            if let Some(message) = self.next_message() {
                return Some(Ok(message));
            }
            if self.changes.changed().await.is_err() {
                // The sender lives in `Shared`, which this member keeps alive.
                unreachable!("the broker's change channel outlives its members");
            }
        }
    }

    async fn ack(&mut self, message: &Message) -> Result<(), Error> {
        let mut state = self.shared.state.lock();
        let partition = self.held(&mut state, message)?;
        partition.acked.insert(message.offset);
        while partition.acked.remove(&partition.committed) {
            partition.deliveries.remove(&partition.committed);
            partition.committed += 1;
        }
        Ok(())
    }

    async fn nack(&mut self, message: &Message) -> Result<(), Error> {
        {
            let mut state = self.shared.state.lock();
            let partition = self.held(&mut state, message)?;
            partition.cursor = message.offset;
        }
        self.shared.changed();
        Ok(())
    }

    async fn close(mut self: Box<Self>) -> Result<(), Error> {
        self.leave();
        Ok(())
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        self.leave();
    }
}

impl Shared {
    fn changed(&self) {
        self.changes
            .send_modify(|count| *count = count.wrapping_add(1));
    }
}

impl State {
    /// The topic, created with `partitions` partitions on first use.
    fn topic(&mut self, name: &TopicName, partitions: u32) -> &mut Topic {
        self.topics.entry(name.clone()).or_insert_with(|| Topic {
            partitions: (0..partitions).map(|_| Vec::new()).collect(),
            groups: HashMap::new(),
        })
    }
}

impl Group {
    /// Reassigns the partitions to the members with the sticky [`broker::rebalance`]; a
    /// partition that changes owner restarts at the committed offset, so that the new owner
    /// receives the un-acked messages again.
    fn rebalance(&mut self) {
        let mut owners: Vec<Option<u64>> = self.partitions.iter().map(|p| p.owner).collect();
        broker::rebalance(&mut owners, &self.members);
        for (partition, owner) in self.partitions.iter_mut().zip(owners) {
            if partition.owner != owner {
                partition.owner = owner;
                partition.cursor = partition.committed;
            }
        }
    }
}

impl Member {
    /// Delivers the next message of this member's partitions, if there is one.
    fn next_message(&mut self) -> Option<Message> {
        let partitions = self.shared.partitions;
        let mut state = self.shared.state.lock();
        let topic = state
            .topics
            .get_mut(&self.topic)
            .expect("a member's topic exists: topics are never removed");
        let group = topic
            .groups
            .get_mut(&self.group)
            .expect("a member's group exists: groups are never removed");
        for step in 0..partitions {
            let index = (self.partition_next + step) % partitions;
            let progress = &mut group.partitions[index as usize];
            if progress.owner != Some(self.id) {
                continue;
            }
            let log = &topic.partitions[index as usize];
            // Messages acked out of order need no second delivery, whether still in `acked`
            // or already folded into the committed offset.
            progress.cursor = progress.cursor.max(progress.committed);
            while progress.acked.contains(&progress.cursor) {
                progress.cursor += 1;
            }
            let Some(event) = log.get(progress.cursor as usize) else {
                continue;
            };
            let offset = progress.cursor;
            progress.cursor += 1;
            let attempt = progress.deliveries.entry(offset).or_insert(0);
            *attempt += 1;
            self.partition_next = (index + 1) % partitions;
            return Some(Message {
                topic: self.topic.clone(),
                partition: index,
                offset,
                attempt: *attempt,
                event: event.clone(),
            });
        }
        None
    }

    /// The group's progress in `message`'s partition, if this member holds `message`:
    /// delivered to it, not acked, and its partition not reassigned since.
    fn held<'s>(
        &self,
        state: &'s mut State,
        message: &Message,
    ) -> Result<&'s mut GroupPartition, Error> {
        let not_held = || Error::NotHeld {
            topic: message.topic.clone(),
            partition: message.partition,
            offset: message.offset,
        };
        if message.topic != self.topic {
            return Err(not_held());
        }
        let progress = state
            .topics
            .get_mut(&self.topic)
            .and_then(|topic| topic.groups.get_mut(&self.group))
            .and_then(|group| group.partitions.get_mut(message.partition as usize))
            .ok_or_else(not_held)?;
        let held = progress.owner == Some(self.id)
            && progress.committed <= message.offset
            && message.offset < progress.cursor
            && !progress.acked.contains(&message.offset);
        if held { Ok(progress) } else { Err(not_held()) }
    }

    /// Leaves the group once; the remaining members take over its partitions.
    fn leave(&mut self) {
        if std::mem::replace(&mut self.left, true) {
            return;
        }
        {
            let mut state = self.shared.state.lock();
            if let Some(group) = state
                .topics
                .get_mut(&self.topic)
                .and_then(|topic| topic.groups.get_mut(&self.group))
            {
                group.members.retain(|member| *member != self.id);
                group.rebalance();
            }
        }
        self.shared.changed();
    }
}
