//! The events of the order flow: their payloads, and the one way their envelopes are made.
//!
//! Every event of one order goes to the same topic with the order id as its partition key,
//! so the events of an order are stored and delivered in causal order. Each envelope
//! carries:
//!
//! | attribute       | value                                                            |
//! |-----------------|------------------------------------------------------------------|
//! | `id`            | a fresh UUIDv7, fixed when the event is written to an outbox      |
//! | `source`        | `herald://orders/<service>`, the service that emitted it          |
//! | `type`          | the payload's [`OrderEvent::TYPE`], e.g. `OrderPlaced`            |
//! | `time`          | when it was emitted                                               |
//! | `subject`       | the order id                                                      |
//! | `partitionkey`  | the order id                                                      |
//! | `correlationid` | the order's correlation id, set when the order is placed          |
//! | `causationid`   | the id of the event it reacts to (absent on `OrderPlaced`)        |
//! | `traceparent`   | the cause's, when it has one                                      |
//!
//! Payloads are JSON objects with camelCase members. Each event carries what its consumers
//! need (event-carried state), so no service asks another for data.

use herald_core::Event;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// The scheme and authority of every event source: `herald://orders/<service>`.
pub const SOURCE_PREFIX: &str = "herald://orders/";

/// The payload of an event of the order flow.
pub trait OrderEvent: Serialize + DeserializeOwned + Send + 'static {
    /// The CloudEvents `type`.
    const TYPE: &'static str;

    /// The order the event is about: its subject and partition key.
    fn order_id(&self) -> &str;
}

/// A service of the order system.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Service {
    /// Takes orders over HTTP and settles them.
    Order,
    /// Charges and refunds.
    Payment,
    /// Reserves stock.
    Inventory,
    /// Schedules shipments.
    Shipping,
    /// Sends e-mails.
    Notification,
    /// Keeps the read model of the business.
    Analytics,
    /// Keeps every event.
    Audit,
}

impl Service {
    /// Every service.
    pub const ALL: [Service; 7] = [
        Service::Order,
        Service::Payment,
        Service::Inventory,
        Service::Shipping,
        Service::Notification,
        Service::Analytics,
        Service::Audit,
    ];

    /// The services that emit events (through their outbox).
    pub const EMITTING: [Service; 4] = [
        Service::Order,
        Service::Payment,
        Service::Inventory,
        Service::Shipping,
    ];

    /// The services that consume the topic as a consumer group named after them.
    pub const CONSUMING: [Service; 6] = [
        Service::Order,
        Service::Payment,
        Service::Inventory,
        Service::Shipping,
        Service::Notification,
        Service::Audit,
    ];

    /// Its name: the consumer group, the database file and the end of the event source.
    pub fn as_str(self) -> &'static str {
        match self {
            Service::Order => "order",
            Service::Payment => "payment",
            Service::Inventory => "inventory",
            Service::Shipping => "shipping",
            Service::Notification => "notification",
            Service::Analytics => "analytics",
            Service::Audit => "audit",
        }
    }

    /// The `source` of the events it emits.
    pub fn source(self) -> String {
        format!("{SOURCE_PREFIX}{}", self.as_str())
    }
}

impl std::fmt::Display for Service {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One line of an order, priced.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OrderLine {
    /// The product.
    pub product_id: String,
    /// How many, at least 1.
    pub quantity: u32,
    /// The unit price when the order was placed, in cents.
    pub unit_price_cents: u64,
}

/// A product and a quantity.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ItemQuantity {
    /// The product.
    pub product_id: String,
    /// How many.
    pub quantity: u32,
}

impl From<&OrderLine> for ItemQuantity {
    fn from(line: &OrderLine) -> Self {
        ItemQuantity {
            product_id: line.product_id.clone(),
            quantity: line.quantity,
        }
    }
}

/// An order was accepted: the start of every order's flow.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OrderPlaced {
    /// The order.
    pub order_id: String,
    /// Who ordered.
    pub customer_id: String,
    /// What, priced.
    pub items: Vec<OrderLine>,
    /// The sum of the lines, in cents.
    pub total_cents: u64,
    /// Where to ship.
    pub shipping_address: String,
    /// How to charge.
    pub payment_method: String,
}

/// The order's amount was charged.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PaymentProcessed {
    /// The order.
    pub order_id: String,
    /// Who was charged.
    pub customer_id: String,
    /// The gateway's id of the charge.
    pub charge_id: String,
    /// How much, in cents.
    pub amount_cents: u64,
    /// What to reserve.
    pub items: Vec<ItemQuantity>,
}

/// Why a charge was declined.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeclineReason {
    /// The amount is above the customer's credit limit.
    OverLimit,
    /// The payment method is the test method `card_declined`.
    CardDeclined,
    /// The gateway declined at random (the `fail_payment_rate` switch).
    GatewayDeclined,
}

impl DeclineReason {
    /// The reason as a snake_case word.
    pub fn as_str(self) -> &'static str {
        match self {
            DeclineReason::OverLimit => "over_limit",
            DeclineReason::CardDeclined => "card_declined",
            DeclineReason::GatewayDeclined => "gateway_declined",
        }
    }
}

/// The charge was declined; nothing was charged.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PaymentFailed {
    /// The order.
    pub order_id: String,
    /// Who was to be charged.
    pub customer_id: String,
    /// How much was asked, in cents.
    pub amount_cents: u64,
    /// Why it was declined.
    pub reason: DeclineReason,
    /// The reason in words.
    pub detail: String,
}

/// Every item of the order is reserved.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct InventoryReserved {
    /// The order.
    pub order_id: String,
    /// What was reserved.
    pub items: Vec<ItemQuantity>,
}

/// A product the inventory has too few of.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Shortage {
    /// The product.
    pub product_id: String,
    /// How many the order asks for.
    pub requested: u64,
    /// How many are available.
    pub available: u64,
}

impl Shortage {
    /// How many are missing.
    pub fn short_by(&self) -> u64 {
        self.requested.saturating_sub(self.available)
    }
}

/// Some item of the order is short; nothing was reserved.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct InventoryFailed {
    /// The order.
    pub order_id: String,
    /// Every product that is short, in the order's line order.
    pub shortages: Vec<Shortage>,
}

/// The order's charge was refunded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PaymentRefunded {
    /// The order.
    pub order_id: String,
    /// Who was refunded.
    pub customer_id: String,
    /// The refunded charge.
    pub charge_id: String,
    /// How much, in cents.
    pub amount_cents: u64,
    /// Why, in words (e.g. which product was short).
    pub detail: String,
}

/// A shipment was scheduled.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ShippingScheduled {
    /// The order.
    pub order_id: String,
    /// The shipment.
    pub shipment_id: String,
    /// The carrier's tracking number.
    pub tracking_number: String,
    /// The carrier.
    pub carrier: String,
}

/// The order went through: charged, reserved and shipped.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OrderCompleted {
    /// The order.
    pub order_id: String,
    /// Who ordered.
    pub customer_id: String,
    /// What, priced.
    pub items: Vec<OrderLine>,
    /// The amount charged, in cents.
    pub total_cents: u64,
    /// The shipment's tracking number.
    pub tracking_number: String,
}

/// Why an order was cancelled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CancelReason {
    /// The payment was declined.
    PaymentDeclined,
    /// An item was short; the payment was refunded.
    OutOfStock,
}

impl CancelReason {
    /// The reason as a snake_case word.
    pub fn as_str(self) -> &'static str {
        match self {
            CancelReason::PaymentDeclined => "payment_declined",
            CancelReason::OutOfStock => "out_of_stock",
        }
    }

    /// The reason named by [`as_str`](Self::as_str).
    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "payment_declined" => Some(CancelReason::PaymentDeclined),
            "out_of_stock" => Some(CancelReason::OutOfStock),
            _ => None,
        }
    }
}

/// The order was cancelled; nothing is charged and nothing is reserved.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OrderCancelled {
    /// The order.
    pub order_id: String,
    /// Who ordered.
    pub customer_id: String,
    /// The order's amount, in cents (not charged, or refunded).
    pub total_cents: u64,
    /// Why.
    pub reason: CancelReason,
    /// Why, in words.
    pub detail: String,
}

macro_rules! order_events {
    ($($payload:ident),* $(,)?) => {
        $(
            impl OrderEvent for $payload {
                const TYPE: &'static str = stringify!($payload);

                fn order_id(&self) -> &str {
                    &self.order_id
                }
            }
        )*

        /// Every event type of the order flow.
        pub const TYPES: &[&str] = &[$(stringify!($payload)),*];

        /// The payload of any event of the order flow.
        #[derive(Debug, Clone, PartialEq, Eq)]
        #[allow(clippy::large_enum_variant)]
        pub enum Payload {
            $(
                #[doc = concat!("A `", stringify!($payload), "`.")]
                $payload($payload),
            )*
        }

        impl Payload {
            /// The payload of `event`: `Ok(None)` when its type is not of the order flow,
            /// an error when its data does not match its type.
            pub fn of(event: &Event) -> Result<Option<Payload>, serde_json::Error> {
                Ok(Some(match event.ty.as_str() {
                    $(
                        stringify!($payload) => Payload::$payload(data(event)?),
                    )*
                    _ => return Ok(None),
                }))
            }

            /// The order the event is about.
            pub fn order_id(&self) -> &str {
                match self {
                    $(Payload::$payload(payload) => &payload.order_id,)*
                }
            }
        }
    };
}

order_events!(
    OrderPlaced,
    PaymentProcessed,
    PaymentFailed,
    InventoryReserved,
    InventoryFailed,
    PaymentRefunded,
    ShippingScheduled,
    OrderCompleted,
    OrderCancelled,
);

fn data<T: DeserializeOwned>(event: &Event) -> Result<T, serde_json::Error> {
    match event.data_as::<T>()? {
        Some(data) => Ok(data),
        None => serde_json::from_str("null"),
    }
}

/// The envelope of `payload`, emitted by `service`, as the start of a flow whose
/// correlation id is `correlation_id` (no cause).
pub fn first_event<T: OrderEvent>(service: Service, payload: &T, correlation_id: &str) -> Event {
    envelope(service, payload).with_correlation_id(correlation_id)
}

/// The envelope of `payload`, emitted by `service` in reaction to `cause`: its
/// `causationid` is the cause's id, its `correlationid` the cause's (or, when the cause has
/// none, the cause's id), and the cause's `traceparent` is carried over.
pub fn caused_event<T: OrderEvent>(service: Service, payload: &T, cause: &Event) -> Event {
    let correlation_id = cause.correlation_id().unwrap_or(&cause.id);
    let mut event = envelope(service, payload)
        .with_correlation_id(correlation_id)
        .with_causation_id(cause.id.as_str());
    if let Some(traceparent) = cause.traceparent() {
        event = event.with_traceparent(traceparent);
    }
    event
}

fn envelope<T: OrderEvent>(service: Service, payload: &T) -> Event {
    Event::new(service.source(), T::TYPE)
        .with_time_now()
        .with_subject(payload.order_id())
        .with_partition_key(payload.order_id())
        .with_data_as(payload)
        // The payloads are plain structs of strings, numbers and enums.
        .expect("an order event always serialises")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelopes_carry_the_order_the_correlation_and_the_cause() {
        let placed = OrderPlaced {
            order_id: "o-1".to_owned(),
            customer_id: "cust-alice".to_owned(),
            items: vec![OrderLine {
                product_id: "prod-mouse".to_owned(),
                quantity: 2,
                unit_price_cents: 2_900,
            }],
            total_cents: 5_800,
            shipping_address: "1 Main St".to_owned(),
            payment_method: "card".to_owned(),
        };
        let first = first_event(Service::Order, &placed, "corr-1")
            .with_traceparent("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01");
        first.validate().unwrap();
        assert_eq!(first.ty, "OrderPlaced");
        assert_eq!(first.source, "herald://orders/order");
        assert_eq!(first.subject.as_deref(), Some("o-1"));
        assert_eq!(first.partition_key(), Some("o-1"));
        assert_eq!(first.correlation_id(), Some("corr-1"));
        assert_eq!(first.causation_id(), None);
        assert_eq!(
            Payload::of(&first).unwrap(),
            Some(Payload::OrderPlaced(placed))
        );
        let json: serde_json::Value = first.data.as_ref().unwrap().to_value().unwrap();
        assert_eq!(
            json["items"][0]["unitPriceCents"], 2_900,
            "camelCase: {json}"
        );

        let failed = PaymentFailed {
            order_id: "o-1".to_owned(),
            customer_id: "cust-alice".to_owned(),
            amount_cents: 5_800,
            reason: DeclineReason::CardDeclined,
            detail: "declined".to_owned(),
        };
        let caused = caused_event(Service::Payment, &failed, &first);
        assert_eq!(caused.source, "herald://orders/payment");
        assert_eq!(caused.correlation_id(), Some("corr-1"));
        assert_eq!(caused.causation_id(), Some(first.id.as_str()));
        assert_eq!(caused.traceparent(), first.traceparent());
        assert_ne!(caused.id, first.id);
        let json: serde_json::Value = caused.data.as_ref().unwrap().to_value().unwrap();
        assert_eq!(json["reason"], "card_declined");
    }

    #[test]
    fn foreign_types_are_not_payloads_and_bad_data_is_an_error() {
        let other = Event::new("/x", "SomethingElse").with_data(serde_json::json!({"a": 1}));
        assert_eq!(Payload::of(&other).unwrap(), None);
        let bad = Event::new("/x", "OrderPlaced").with_data(serde_json::json!({"orderId": 1}));
        assert!(Payload::of(&bad).is_err());
        assert_eq!(TYPES.len(), 9);
    }
}
