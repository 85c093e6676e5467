pub mod domain;
pub mod store;
pub mod proto {
    tonic::include_proto!("outboxd.v1");
}
