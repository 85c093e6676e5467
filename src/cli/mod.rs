//! The operator tools: the commands that drive a gateway from outside,
//! apart from the server's rooms. They reach it the way any client does
//! (gRPC, Kafka, the store's database) and may use `anyhow`, being the
//! application layer.
//!
//! - [`admin`]: `outboxd admin …`, the OutboxAdmin operations from the command line.
//! - [`bench`](mod@bench): `outboxd bench`, outboxd against its baselines in one run.
//! - [`client`]: how the tools reach a (secured) gateway.
//! - [`dev`]: `outboxd dev`, the embedded default with an in-process broker.
//! - [`tail`]: `outboxd tail`, and the one way the tools build a consumer of
//!   outboxd's topics.

pub mod admin;
pub mod bench;
pub mod client;
pub mod dev;
pub mod tail;
