//! The segment format: the events of one coalesced commit for one shard,
//! packed into one value, and the event ids that name where an event is
//! packed.
//!
//! A segment costs the store one row and one index entry however many
//! events it holds, so that the store's work per event is about its bytes
//! (`docs/benchmarks.md`, "Store layouts for the store's redesign").
//!
//! **Packing.** A segment's body is a protobuf message ([`SegmentBody`]):
//! the transactions its events belong to, once each, and the events in
//! append order, each naming its transaction by index. Protobuf keeps the
//! format open to new fields, and decoding needs nothing but prost. A
//! topic, event type or aggregate type is stored once per segment, however
//! many of its events share it; each event names it by index. (Bodies
//! written before that hold every string inline and read back the same.)
//!
//! **Ids.** An event id that outboxd generates is a UUID of version 7 that
//! names its segment and its position there ([`EventLocation`]):
//!
//! ```text
//!  48 bits  unix time of the segment, in milliseconds
//!   4 bits  version (7)
//!  12 bits  segment number, high bits
//!   2 bits  variant (RFC 9562)
//!  46 bits  segment number, low bits
//!  16 bits  position in the segment
//! ```
//!
//! So ids stay unique (one segment number per segment, one position per
//! event), time-ordered (the time leads; segments numbered later order
//! later within a millisecond) and valid v7 UUIDs, and a status lookup
//! finds the event from its id alone. Any UUID decodes to some location;
//! it names that event only when the segment's own time is the one in the
//! id ([`EventLocation::id`] gives it back), which is how a caller-chosen
//! id is told apart.

use std::collections::HashMap;

use prost::Message;
use uuid::Uuid;

use crate::domain::{EventId, Header, NewEvent};

/// Most events one segment holds: positions are 16 bits.
pub const MAX_SEGMENT_EVENTS: usize = 1 << 16;

/// Largest segment number an id can carry (58 bits).
pub const MAX_SEGMENT_NUMBER: u64 = (1 << 58) - 1;

/// Where an event is packed: its segment and its position there.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct EventLocation {
    /// The segment's number (at most [`MAX_SEGMENT_NUMBER`]).
    pub segment: u64,
    /// The event's index among the segment's events.
    pub position: u16,
}

impl EventLocation {
    /// The id outboxd gives the event at this location of a segment made
    /// at `segment_millis` (unix time in milliseconds, 48 bits).
    pub fn id(self, segment_millis: u64) -> EventId {
        debug_assert!(self.segment <= MAX_SEGMENT_NUMBER);
        let millis = segment_millis & ((1 << 48) - 1);
        let high = (millis << 16) | (0x7 << 12) | ((self.segment >> 46) & 0xfff);
        let low = (0b10 << 62) | ((self.segment & ((1 << 46) - 1)) << 16) | self.position as u64;
        EventId(Uuid::from_u64_pair(high, low))
    }

    /// The location an id names, with the segment time it carries; `None`
    /// when it is not a version 7 UUID of the RFC variant (never one
    /// outboxd generated).
    pub fn of(id: EventId) -> Option<(EventLocation, u64)> {
        let (high, low) = id.0.as_u64_pair();
        if (high >> 12) & 0xf != 0x7 || low >> 62 != 0b10 {
            return None;
        }
        let segment = ((high & 0xfff) << 46) | ((low >> 16) & ((1 << 46) - 1));
        let location = EventLocation {
            segment,
            position: (low & 0xffff) as u16,
        };
        Some((location, high >> 16))
    }
}

/// The transaction of some of a segment's events.
#[derive(Clone, PartialEq, Eq, Message)]
pub struct SegmentTransaction {
    /// The producer the caller acts for.
    #[prost(string, tag = "1")]
    pub producer: String,
    /// The caller's transaction id.
    #[prost(string, tag = "2")]
    pub transaction_id: String,
    /// The append's number within its transaction.
    #[prost(uint64, tag = "3")]
    pub append_sequence: u64,
    /// The append's place among the appends of the commit that stored it:
    /// with [`SegmentEvent::index`], the order the events were appended in.
    #[prost(uint32, tag = "4")]
    pub batch: u32,
}

/// A header of a packed event.
#[derive(Clone, PartialEq, Eq, Message)]
pub struct SegmentHeader {
    /// The header's name.
    #[prost(string, tag = "1")]
    pub key: String,
    /// The header's value.
    #[prost(bytes = "vec", tag = "2")]
    pub value: Vec<u8>,
}

/// One packed event.
#[derive(Clone, PartialEq, Eq, Message)]
pub struct SegmentEvent {
    /// Index of its transaction in [`SegmentBody::transactions`].
    #[prost(uint32, tag = "1")]
    pub transaction: u32,
    /// The caller's own id (16 bytes), when it chose one; else the id is
    /// the one its location names.
    #[prost(bytes = "vec", optional, tag = "2")]
    pub caller_id: Option<Vec<u8>>,
    /// The Kafka topic.
    #[prost(string, tag = "3")]
    pub topic: String,
    /// The Kafka key as given; absent when the caller gave none.
    #[prost(bytes = "vec", optional, tag = "4")]
    pub key: Option<Vec<u8>>,
    /// The record's value.
    #[prost(bytes = "vec", tag = "5")]
    pub payload: Vec<u8>,
    /// The caller's headers, in order.
    #[prost(message, repeated, tag = "6")]
    pub headers: Vec<SegmentHeader>,
    /// The aggregate's type.
    #[prost(string, tag = "7")]
    pub aggregate_type: String,
    /// The aggregate's id.
    #[prost(string, tag = "8")]
    pub aggregate_id: String,
    /// The event's type.
    #[prost(string, tag = "9")]
    pub event_type: String,
    /// When it happened, in unix microseconds; absent when not given.
    #[prost(int64, optional, tag = "10")]
    pub occurred_at_micros: Option<i64>,
    /// W3C traceparent of the append, when traced.
    #[prost(string, optional, tag = "11")]
    pub traceparent: Option<String>,
    /// W3C tracestate of the append.
    #[prost(string, optional, tag = "12")]
    pub tracestate: Option<String>,
    /// The event's index in its append.
    #[prost(uint32, tag = "13")]
    pub index: u32,
    /// The topic, as an index into [`SegmentBody::strings`] (then `topic`
    /// is empty). Only in stored bodies: a decoded segment has it inline.
    #[prost(uint32, optional, tag = "14")]
    pub topic_ref: Option<u32>,
    /// The aggregate's type, as `topic_ref`.
    #[prost(uint32, optional, tag = "15")]
    pub aggregate_type_ref: Option<u32>,
    /// The event's type, as `topic_ref`.
    #[prost(uint32, optional, tag = "16")]
    pub event_type_ref: Option<u32>,
}

/// A segment's packed events: what its `body` column holds.
#[derive(Clone, PartialEq, Eq, Message)]
pub struct SegmentBody {
    /// The transactions of the events, each once.
    #[prost(message, repeated, tag = "1")]
    pub transactions: Vec<SegmentTransaction>,
    /// The events in append order; an event's position is its index.
    #[prost(message, repeated, tag = "2")]
    pub events: Vec<SegmentEvent>,
    /// The strings the events name by index (`*_ref`), each once.
    #[prost(string, repeated, tag = "3")]
    pub strings: Vec<String>,
}

impl SegmentBody {
    /// Puts every string an event names by index back into the event.
    fn resolve(&mut self) -> Result<(), SegmentError> {
        let strings = std::mem::take(&mut self.strings);
        for (position, event) in self.events.iter_mut().enumerate() {
            for (reference, field) in [
                (event.topic_ref.take(), &mut event.topic),
                (event.aggregate_type_ref.take(), &mut event.aggregate_type),
                (event.event_type_ref.take(), &mut event.event_type),
            ] {
                if let Some(reference) = reference {
                    let string =
                        strings
                            .get(reference as usize)
                            .ok_or(SegmentError::UnknownString {
                                position,
                                reference,
                                strings: strings.len(),
                            })?;
                    field.clone_from(string);
                }
            }
        }
        Ok(())
    }
}

/// Why a segment body could not be read back.
#[derive(Debug, thiserror::Error)]
pub enum SegmentError {
    /// The bytes are not a segment body.
    #[error("a segment body does not decode: {0}")]
    Decode(#[from] prost::DecodeError),
    /// An event names a transaction the segment does not hold.
    #[error("event {position} of a segment names transaction {transaction} of {transactions}")]
    UnknownTransaction {
        /// The event's position.
        position: usize,
        /// The index it names.
        transaction: u32,
        /// How many the segment holds.
        transactions: usize,
    },
    /// An event names a string the segment does not hold.
    #[error("event {position} of a segment names string {reference} of {strings}")]
    UnknownString {
        /// The event's position.
        position: usize,
        /// The index it names.
        reference: u32,
        /// How many the segment holds.
        strings: usize,
    },
    /// A caller-chosen id is not 16 bytes.
    #[error("event {0} of a segment has a caller id that is not 16 bytes")]
    BadCallerId(usize),
}

/// Which append an event of [`SegmentBuilder::push`] comes from.
#[derive(Debug, Clone, Copy)]
pub struct AppendPlace<'a> {
    /// The producer the caller acts for.
    pub producer: &'a str,
    /// The caller's transaction id.
    pub transaction_id: &'a str,
    /// The append's number within its transaction.
    pub sequence: u64,
    /// The append's place among the appends of its commit.
    pub batch: u32,
    /// The event's index in its append.
    pub index: u32,
    /// W3C traceparent of the append, when traced.
    pub traceparent: Option<&'a str>,
    /// W3C tracestate of the append.
    pub tracestate: Option<&'a str>,
}

/// Builds one segment's body, event by event, in append order.
#[derive(Debug, Default)]
pub struct SegmentBuilder {
    /// The body as stored: shared strings by index.
    body: SegmentBody,
    /// The index of each string in `body.strings`.
    strings: HashMap<String, u32>,
}

impl SegmentBuilder {
    /// Adds `event` of the append `append` names; returns its position.
    /// The caller keeps a segment within [`MAX_SEGMENT_EVENTS`].
    pub fn push(&mut self, append: AppendPlace<'_>, event: &NewEvent) -> u16 {
        let AppendPlace {
            producer,
            transaction_id,
            sequence,
            batch,
            index,
            traceparent,
            tracestate,
        } = append;
        let position = self.body.events.len();
        debug_assert!(position < MAX_SEGMENT_EVENTS);
        // Appends of one transaction come together, so the last one is
        // nearly always the one to reuse.
        let transaction = match self.body.transactions.last() {
            Some(last)
                if last.producer == producer
                    && last.transaction_id == transaction_id
                    && last.append_sequence == sequence
                    && last.batch == batch =>
            {
                self.body.transactions.len() - 1
            }
            _ => {
                self.body.transactions.push(SegmentTransaction {
                    producer: producer.to_owned(),
                    transaction_id: transaction_id.to_owned(),
                    append_sequence: sequence,
                    batch,
                });
                self.body.transactions.len() - 1
            }
        };
        let topic_ref = self.intern(&event.topic);
        let aggregate_type_ref = self.intern(&event.aggregate_type);
        let event_type_ref = self.intern(&event.event_type);
        self.body.events.push(SegmentEvent {
            transaction: transaction as u32,
            caller_id: event.event_id.map(|id| id.0.as_bytes().to_vec()),
            topic: String::new(),
            topic_ref,
            key: event.key.clone(),
            payload: event.payload.clone(),
            headers: event
                .headers
                .iter()
                .map(|header| SegmentHeader {
                    key: header.key.clone(),
                    value: header.value.clone(),
                })
                .collect(),
            aggregate_type: String::new(),
            aggregate_type_ref,
            aggregate_id: event.aggregate_id.clone(),
            event_type: String::new(),
            event_type_ref,
            occurred_at_micros: event.occurred_at.map(|at| at.timestamp_micros()),
            traceparent: traceparent.map(str::to_owned),
            tracestate: tracestate.map(str::to_owned),
            index,
        });
        position as u16
    }

    /// `string`'s index among the body's shared strings; `None` for the
    /// empty string, which costs nothing inline.
    fn intern(&mut self, string: &str) -> Option<u32> {
        if string.is_empty() {
            return None;
        }
        if let Some(&index) = self.strings.get(string) {
            return Some(index);
        }
        let index = self.body.strings.len() as u32;
        self.body.strings.push(string.to_owned());
        self.strings.insert(string.to_owned(), index);
        Some(index)
    }

    /// Events added so far.
    pub fn len(&self) -> usize {
        self.body.events.len()
    }

    /// Whether no event was added.
    pub fn is_empty(&self) -> bool {
        self.body.events.is_empty()
    }

    /// The body's bytes, as stored.
    pub fn encode(&self) -> Vec<u8> {
        self.body.encode_to_vec()
    }

    /// The body's bytes, and the segment they make as segment `number` of
    /// `millis`.
    pub fn finish(self, number: u64, millis: u64) -> (Vec<u8>, Segment) {
        let bytes = self.encode();
        let mut body = self.body;
        body.resolve()
            .expect("a built segment names only strings it holds");
        (
            bytes,
            Segment {
                number,
                millis,
                body,
            },
        )
    }
}

/// One event read back from a segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackedEvent<'a> {
    /// Its position in the segment.
    pub position: u16,
    /// Its transaction.
    pub transaction: &'a SegmentTransaction,
    /// Its id: the caller's, or the one its location names.
    pub event_id: EventId,
    /// The packed event.
    pub event: &'a SegmentEvent,
}

/// A decoded segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Segment {
    /// The segment's number.
    pub number: u64,
    /// When it was made, in unix milliseconds: the time in its events' ids.
    pub millis: u64,
    /// Its packed events.
    pub body: SegmentBody,
}

impl Segment {
    /// Reads a stored body back, checking that every event's transaction
    /// and caller id are well formed.
    pub fn decode(number: u64, millis: u64, bytes: &[u8]) -> Result<Segment, SegmentError> {
        let mut body = SegmentBody::decode(bytes)?;
        body.resolve()?;
        for (position, event) in body.events.iter().enumerate() {
            if event.transaction as usize >= body.transactions.len() {
                return Err(SegmentError::UnknownTransaction {
                    position,
                    transaction: event.transaction,
                    transactions: body.transactions.len(),
                });
            }
            if event.caller_id.as_ref().is_some_and(|id| id.len() != 16) {
                return Err(SegmentError::BadCallerId(position));
            }
        }
        Ok(Segment {
            number,
            millis,
            body,
        })
    }

    /// The events in position order.
    pub fn events(&self) -> impl Iterator<Item = PackedEvent<'_>> {
        (0..self.body.events.len()).filter_map(move |position| self.event(position as u16))
    }

    /// The event at `position`, when the segment holds one there.
    pub fn event(&self, position: u16) -> Option<PackedEvent<'_>> {
        let event = self.body.events.get(usize::from(position))?;
        let event_id = match &event.caller_id {
            Some(id) => EventId(Uuid::from_slice(id).unwrap_or_default()),
            None => EventLocation {
                segment: self.number,
                position,
            }
            .id(self.millis),
        };
        Some(PackedEvent {
            position,
            transaction: &self.body.transactions[event.transaction as usize],
            event_id,
            event,
        })
    }

    /// The event `id` names, when it is one of this segment's: a generated
    /// id of its number, time and a position it holds, or a caller id it
    /// holds.
    pub fn find(&self, id: EventId) -> Option<PackedEvent<'_>> {
        let generated = EventLocation::of(id)
            .filter(|(location, millis)| location.segment == self.number && *millis == self.millis)
            .and_then(|(location, _)| self.event(location.position))
            .filter(|found| found.event_id == id);
        generated.or_else(|| self.events().find(|packed| packed.event_id == id))
    }
}

/// The headers of a packed event, as the domain has them.
pub fn headers(event: &SegmentEvent) -> Vec<Header> {
    event
        .headers
        .iter()
        .map(|header| Header {
            key: header.key.clone(),
            value: header.value.clone(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(key: &str, payload: &[u8]) -> NewEvent {
        NewEvent {
            headers: vec![Header {
                key: "source".into(),
                value: b"shop".to_vec(),
            }],
            ..crate::domain::test_event(Some(key.as_bytes()), payload)
        }
    }

    #[test]
    fn generated_ids_are_version_7_uuids_that_name_their_location() {
        let millis = 1_796_000_000_123;
        for (segment, position) in [
            (0, 0),
            (1, 1),
            (4_095, 65_535),
            (1 << 46, 7),
            ((1 << 46) - 1, 300),
            (MAX_SEGMENT_NUMBER, u16::MAX),
        ] {
            let location = EventLocation { segment, position };
            let id = location.id(millis);
            assert_eq!(id.0.get_version_num(), 7, "{location:?}");
            assert_eq!(id.0.get_variant(), uuid::Variant::RFC4122, "{location:?}");
            assert_eq!(EventLocation::of(id), Some((location, millis)));
            // The standard reading of a v7 UUID's time agrees.
            let (seconds, nanos) = id.0.get_timestamp().expect("a v7 time").to_unix();
            assert_eq!(seconds * 1_000 + u64::from(nanos) / 1_000_000, millis);
        }
    }

    #[test]
    fn generated_ids_order_by_time_then_segment_then_position() {
        let ids: Vec<EventId> = [
            (1_000, 9, 5),
            (1_000, 10, 0),
            (1_000, 10, 1),
            (1_000, 1 << 50, 0),
            (1_001, 0, 0),
        ]
        .into_iter()
        .map(|(millis, segment, position)| EventLocation { segment, position }.id(millis))
        .collect();
        let mut sorted = ids.clone();
        sorted.sort();
        assert_eq!(sorted, ids);
        // Sorting by the canonical text agrees, as a database's would.
        let mut texts: Vec<String> = ids.iter().map(ToString::to_string).collect();
        texts.sort();
        assert_eq!(
            texts,
            ids.iter().map(ToString::to_string).collect::<Vec<_>>()
        );
    }

    #[test]
    fn uuids_outboxd_never_generates_name_no_location() {
        assert_eq!(EventLocation::of(EventId(Uuid::new_v4())), None);
        assert_eq!(EventLocation::of(EventId(Uuid::nil())), None);
        assert_eq!(EventLocation::of(EventId(Uuid::max())), None);
    }

    fn place<'a>(
        producer: &'a str,
        transaction_id: &'a str,
        sequence: u64,
        index: u32,
        traceparent: Option<&'a str>,
    ) -> AppendPlace<'a> {
        AppendPlace {
            producer,
            transaction_id,
            sequence,
            batch: 0,
            index,
            traceparent,
            tracestate: None,
        }
    }

    #[test]
    fn a_segment_gives_back_what_was_packed() {
        let caller_id = EventId(Uuid::new_v4());
        let mut builder = SegmentBuilder::default();
        assert_eq!(
            builder.push(place("shop", "t-1", 0, 0, None), &event("a", b"one")),
            0
        );
        assert_eq!(
            builder.push(
                place(
                    "shop",
                    "t-1",
                    0,
                    1,
                    Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")
                ),
                &event("b", b"two")
            ),
            1
        );
        let chosen = NewEvent {
            event_id: Some(caller_id),
            key: None,
            occurred_at: Some(
                chrono::DateTime::from_timestamp_micros(1_700_000_000_000_001).unwrap(),
            ),
            ..event("c", b"three")
        };
        assert_eq!(builder.push(place("bank", "t-9", 2, 0, None), &chosen), 2);
        assert_eq!(builder.len(), 3);

        let segment = Segment::decode(42, 1_796_000_000_000, &builder.encode()).expect("decodes");
        assert_eq!(segment.body.transactions.len(), 2, "one entry per append");
        let events: Vec<PackedEvent<'_>> = segment.events().collect();
        assert_eq!(events.len(), 3);
        assert_eq!(events[0].event.payload, b"one");
        assert_eq!(events[0].transaction.transaction_id, "t-1");
        assert_eq!(
            events[0].event_id,
            EventLocation {
                segment: 42,
                position: 0
            }
            .id(1_796_000_000_000)
        );
        assert_eq!(
            events[1].event.traceparent.as_deref(),
            Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")
        );
        assert_eq!(headers(events[1].event), event("b", b"").headers);
        assert_eq!(events[2].event_id, caller_id);
        assert_eq!(events[2].transaction.producer, "bank");
        assert_eq!(events[2].transaction.append_sequence, 2);
        assert_eq!(events[2].event.key, None);
        assert_eq!(
            events[2].event.occurred_at_micros,
            Some(1_700_000_000_000_001)
        );

        assert_eq!(
            segment.find(events[1].event_id).map(|e| e.position),
            Some(1)
        );
        assert_eq!(segment.find(caller_id).map(|e| e.position), Some(2));
        // The same location in a segment of another time or number is
        // another event.
        let elsewhere = EventLocation {
            segment: 42,
            position: 1,
        };
        assert!(segment.find(elsewhere.id(1_796_000_000_001)).is_none());
        let other_segment = EventLocation {
            segment: 43,
            position: 1,
        };
        assert!(segment.find(other_segment.id(1_796_000_000_000)).is_none());
        assert!(segment.find(EventId(Uuid::new_v4())).is_none());
    }

    #[test]
    fn a_segment_stores_each_shared_string_once() {
        let topic = "payments.card-authorizations.v2";
        let mut builder = SegmentBuilder::default();
        for index in 0..100u32 {
            let event = NewEvent {
                topic: topic.into(),
                aggregate_type: "card-authorization".into(),
                aggregate_id: format!("auth-{index}"),
                event_type: if index % 2 == 0 {
                    "approved"
                } else {
                    "declined"
                }
                .into(),
                ..event("k", b"p")
            };
            builder.push(place("shop", "t-1", 0, index, None), &event);
        }
        let (bytes, built) = builder.finish(7, 1_796_000_000_000);
        // The same events with every string inline, as decoded.
        let inline = built.body.encode_to_vec();
        let saved_per_event = topic.len() + "card-authorization".len();
        assert!(
            inline.len() - bytes.len() > 99 * saved_per_event,
            "{} bytes shared, {} inline: the strings are stored per event",
            bytes.len(),
            inline.len()
        );
        let read = Segment::decode(7, 1_796_000_000_000, &bytes).expect("decodes");
        assert_eq!(read, built, "what is read back is what was built");
        for packed in read.events() {
            let index = packed.event.index;
            assert_eq!(packed.event.topic, topic);
            assert_eq!(packed.event.aggregate_type, "card-authorization");
            assert_eq!(packed.event.aggregate_id, format!("auth-{index}"));
            let event_type = if index % 2 == 0 {
                "approved"
            } else {
                "declined"
            };
            assert_eq!(packed.event.event_type, event_type);
        }
    }

    #[test]
    fn a_body_with_its_strings_inline_reads_back_the_same() {
        // As written before strings were shared.
        let inline = SegmentEvent {
            transaction: 0,
            topic: "orders".into(),
            aggregate_type: "order".into(),
            aggregate_id: "o-1".into(),
            event_type: "created".into(),
            payload: b"one".to_vec(),
            ..Default::default()
        };
        let body = SegmentBody {
            transactions: vec![SegmentTransaction::default()],
            events: vec![inline.clone()],
            strings: vec![],
        };
        let read = Segment::decode(3, 1, &body.encode_to_vec()).expect("decodes");
        assert_eq!(read.body.events, [inline]);
    }

    #[test]
    fn a_body_that_is_not_a_segment_is_refused() {
        assert!(Segment::decode(1, 1, b"\xff\xff\xff").is_err());
        let broken = SegmentBody {
            transactions: vec![],
            events: vec![SegmentEvent {
                transaction: 0,
                ..Default::default()
            }],
            strings: vec![],
        };
        assert!(matches!(
            Segment::decode(1, 1, &broken.encode_to_vec()),
            Err(SegmentError::UnknownTransaction { .. })
        ));
        let bad_id = SegmentBody {
            transactions: vec![SegmentTransaction::default()],
            events: vec![SegmentEvent {
                caller_id: Some(vec![1, 2, 3]),
                ..Default::default()
            }],
            strings: vec![],
        };
        assert!(matches!(
            Segment::decode(1, 1, &bad_id.encode_to_vec()),
            Err(SegmentError::BadCallerId(0))
        ));
        let missing_string = SegmentBody {
            transactions: vec![SegmentTransaction::default()],
            events: vec![SegmentEvent {
                topic_ref: Some(1),
                ..Default::default()
            }],
            strings: vec!["orders".into()],
        };
        assert!(matches!(
            Segment::decode(1, 1, &missing_string.encode_to_vec()),
            Err(SegmentError::UnknownString {
                position: 0,
                reference: 1,
                strings: 1
            })
        ));
    }
}
