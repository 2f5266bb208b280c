//! Herald's stable core: the CloudEvents envelope, stream names, versions and positions, and
//! the traits every backend implements.
//!
//! **Architecture invariant:** this crate performs no I/O. Backends (`herald-log`, SQL,
//! brokers) depend on it; it depends on none of them.

#![forbid(unsafe_code)]

pub mod broker;
pub mod checkpoint;
pub mod event;
pub mod store;
pub mod stream;

#[cfg(feature = "test-util")]
pub mod conformance;
#[cfg(feature = "test-util")]
pub mod memory;
#[cfg(feature = "test-util")]
pub mod memory_broker;
#[cfg(feature = "test-util")]
pub mod pubsub_conformance;

pub use checkpoint::{CheckpointStore, InMemoryCheckpointStore};
pub use event::{Data, Event, ExtensionValue};
pub use store::{Appended, EventStore, RecordedEvent};
pub use stream::{Direction, ExpectedVersion, Position, StreamName, Version};
