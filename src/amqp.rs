//! RabbitMQ: one connection per role that needs it, named so an operator
//! (or a test) can find it in `rabbitmqctl list_connections`, and the
//! broker objects the API names, declared by whoever uses them (declaring
//! is idempotent while the arguments match).

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{Channel, Connection, ConnectionProperties, ExchangeKind};

use crate::config::AmqpConfig;
use crate::events::EventType;

/// Connects to the broker at `url` under `name` (shown by `rabbitmqctl
/// list_connections name`).
pub async fn connect(url: &str, name: &str) -> lapin::Result<Connection> {
    let props = ConnectionProperties::default().with_connection_name(name.into());
    Connection::connect(url, props).await
}

/// The connection name of one role of this process: `flashsale <role>
/// <host> pid <pid>`, so that several processes on one host stay apart.
pub fn connection_name(role: &str) -> String {
    let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "localhost".into());
    format!("flashsale {role} {host} pid {}", std::process::id())
}

/// Declares the durable topic exchange events go to.
pub async fn declare_exchange(ch: &Channel, exchange: &str) -> lapin::Result<()> {
    ch.exchange_declare(
        exchange.into(),
        ExchangeKind::Topic,
        ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
}

/// Declares the points consumer's durable queue, bound to `order.paid` and
/// `order.refunded` on the exchange, and its dead-letter queue: a message
/// the consumer rejects without requeue goes to `<queue>.dead` by the
/// default exchange. Returns the number of messages waiting.
pub async fn declare_points_queue(ch: &Channel, cfg: &AmqpConfig) -> lapin::Result<u32> {
    let durable = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    let dead = cfg.points_dead_queue();
    ch.queue_declare(dead.as_str().into(), durable, FieldTable::default())
        .await?;
    let mut args = FieldTable::default();
    args.insert(
        "x-dead-letter-exchange".into(),
        AMQPValue::LongString("".into()),
    );
    args.insert(
        "x-dead-letter-routing-key".into(),
        AMQPValue::LongString(dead.as_str().into()),
    );
    let q = ch
        .queue_declare(cfg.points_queue.as_str().into(), durable, args)
        .await?;
    declare_exchange(ch, &cfg.amqp_exchange).await?;
    for t in [EventType::OrderPaid, EventType::OrderRefunded] {
        ch.queue_bind(
            cfg.points_queue.as_str().into(),
            cfg.amqp_exchange.as_str().into(),
            ShortString::from(t.as_str()),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    }
    Ok(q.message_count())
}
