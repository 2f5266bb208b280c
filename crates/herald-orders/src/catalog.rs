//! The reference data every service starts from: the customers and the product catalog.
//!
//! The services seed their own tables from these lists when their database is created
//! (payment: the customers' credit limits; notification: their e-mail addresses; inventory:
//! the stock), and the order service prices orders from the catalog. The lists are fixed:
//! the invariants check stock against [`Product::initial_stock`].
//!
//! The catalog is shaped for demos and load: most products have deep stock, a few are scarce
//! (they run out, so some orders fail on inventory and are refunded), and one is sold out.
//! Two customers have low credit limits, so their larger orders are declined.

/// A customer: who is charged, up to which amount per order, and who gets the e-mails.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Customer {
    /// The id orders name it by.
    pub id: &'static str,
    /// Its display name.
    pub name: &'static str,
    /// Where its e-mails go.
    pub email: &'static str,
    /// The largest order, in cents, the payment gateway accepts for it.
    pub credit_limit_cents: u64,
}

/// A product of the catalog.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Product {
    /// The id orders name it by.
    pub id: &'static str,
    /// Its display name.
    pub name: &'static str,
    /// Its unit price, in cents.
    pub price_cents: u64,
    /// The stock the inventory starts with.
    pub initial_stock: u64,
}

/// Every customer.
pub const CUSTOMERS: &[Customer] = &[
    Customer {
        id: "cust-alice",
        name: "Alice Martin",
        email: "alice@example.com",
        credit_limit_cents: 500_000,
    },
    Customer {
        id: "cust-bob",
        name: "Bob Dupont",
        email: "bob@example.com",
        credit_limit_cents: 250_000,
    },
    Customer {
        id: "cust-carol",
        name: "Carol Nguyen",
        email: "carol@example.com",
        credit_limit_cents: 1_000_000,
    },
    Customer {
        id: "cust-dave",
        name: "Dave Okafor",
        email: "dave@example.com",
        credit_limit_cents: 20_000,
    },
    Customer {
        id: "cust-erin",
        name: "Erin Schmidt",
        email: "erin@example.com",
        credit_limit_cents: 5_000,
    },
    Customer {
        id: "cust-frank",
        name: "Frank Rossi",
        email: "frank@example.com",
        credit_limit_cents: 300_000,
    },
    Customer {
        id: "cust-grace",
        name: "Grace Lee",
        email: "grace@example.com",
        credit_limit_cents: 2_000_000,
    },
    Customer {
        id: "cust-heidi",
        name: "Heidi Svensson",
        email: "heidi@example.com",
        credit_limit_cents: 150_000,
    },
];

/// Every product.
pub const PRODUCTS: &[Product] = &[
    Product {
        id: "prod-keyboard",
        name: "Mechanical keyboard",
        price_cents: 8_900,
        initial_stock: 1_000_000,
    },
    Product {
        id: "prod-mouse",
        name: "Wireless mouse",
        price_cents: 2_900,
        initial_stock: 1_000_000,
    },
    Product {
        id: "prod-monitor",
        name: "27-inch monitor",
        price_cents: 32_900,
        initial_stock: 500_000,
    },
    Product {
        id: "prod-headphones",
        name: "Noise-cancelling headphones",
        price_cents: 19_900,
        initial_stock: 500_000,
    },
    Product {
        id: "prod-webcam",
        name: "HD webcam",
        price_cents: 5_900,
        initial_stock: 1_000_000,
    },
    Product {
        id: "prod-usb-hub",
        name: "USB-C hub",
        price_cents: 3_900,
        initial_stock: 1_000_000,
    },
    Product {
        id: "prod-laptop-stand",
        name: "Laptop stand",
        price_cents: 4_500,
        initial_stock: 1_000_000,
    },
    Product {
        id: "prod-desk-lamp",
        name: "Desk lamp",
        price_cents: 3_500,
        initial_stock: 1_000_000,
    },
    Product {
        id: "prod-notebook",
        name: "Paper notebook",
        price_cents: 900,
        initial_stock: 1_000_000,
    },
    Product {
        id: "prod-gpu",
        name: "Graphics card",
        price_cents: 159_900,
        initial_stock: 25,
    },
    Product {
        id: "prod-vintage-camera",
        name: "Vintage camera",
        price_cents: 45_000,
        initial_stock: 3,
    },
    Product {
        id: "prod-signed-vinyl",
        name: "Signed vinyl record",
        price_cents: 12_000,
        initial_stock: 0,
    },
];

/// The customer with id `id`.
pub fn customer(id: &str) -> Option<&'static Customer> {
    CUSTOMERS.iter().find(|customer| customer.id == id)
}

/// The product with id `id`.
pub fn product(id: &str) -> Option<&'static Product> {
    PRODUCTS.iter().find(|product| product.id == id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_unique_and_found() {
        for (index, customer) in CUSTOMERS.iter().enumerate() {
            assert_eq!(super::customer(customer.id), Some(customer));
            assert!(CUSTOMERS[index + 1..].iter().all(|c| c.id != customer.id));
        }
        for (index, product) in PRODUCTS.iter().enumerate() {
            assert_eq!(super::product(product.id), Some(product));
            assert!(PRODUCTS[index + 1..].iter().all(|p| p.id != product.id));
            assert!(product.price_cents > 0);
        }
        assert!(customer("cust-nobody").is_none());
        assert!(product("prod-nothing").is_none());
    }
}
