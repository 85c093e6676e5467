//! Request builders shared by the tests: tokens, events, appends.

/// An immediate-mode token.
pub fn immediate_token(
    producer: &str,
    transaction_id: &str,
) -> Option<outboxd::proto::TransactionToken> {
    Some(outboxd::proto::TransactionToken {
        producer: producer.into(),
        transaction_id: transaction_id.into(),
        mode: outboxd::proto::TokenMode::Immediate as i32,
        ..Default::default()
    })
}

/// A plain event of `topic` with Kafka key `key`.
pub fn keyed_event(topic: &str, key: &str, payload: &[u8]) -> outboxd::proto::Event {
    outboxd::proto::Event {
        topic: topic.to_owned(),
        key: Some(key.as_bytes().to_vec().into()),
        payload: payload.to_vec().into(),
        aggregate_type: "order".into(),
        aggregate_id: key.to_owned(),
        event_type: "created".into(),
        ..Default::default()
    }
}

/// A first append (sequence 0) of `events` under `token`.
pub fn append_request(
    token: Option<outboxd::proto::TransactionToken>,
    events: Vec<outboxd::proto::Event>,
) -> outboxd::proto::AppendRequest {
    outboxd::proto::AppendRequest {
        token,
        sequence: 0,
        events,
        correlation: 0,
    }
}
