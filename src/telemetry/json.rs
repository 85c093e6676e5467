//! `--log-format json`: one JSON object per line, with the OpenTelemetry
//! trace and span ids of the span the line was written in, so that a log
//! search can jump to the trace and back.

use std::fmt;

use serde_json::{Map, Value};
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_opentelemetry::OtelData;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

/// Formats each event as `{"timestamp", "level", "target", "message",
/// fields…, "span", "trace_id", "span_id"}`.
pub struct JsonLines;

impl<S, N> FormatEvent<S, N> for JsonLines
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let metadata = event.metadata();
        // Keys in a fixed order, the usual ones first, so that the lines
        // read well as text too.
        let mut line: Vec<(String, Value)> = vec![
            (
                "timestamp".into(),
                chrono::Utc::now()
                    .to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
                    .into(),
            ),
            ("level".into(), metadata.level().as_str().into()),
            ("target".into(), metadata.target().into()),
        ];
        let mut fields = JsonFields(Map::new());
        event.record(&mut fields);
        if let Some(message) = fields.0.remove("message") {
            line.push(("message".into(), message));
        }
        if let Some(scope) = ctx.event_scope() {
            let mut innermost = true;
            for span in scope {
                if innermost {
                    line.push(("span".into(), span.name().into()));
                    innermost = false;
                }
                let extensions = span.extensions();
                let ids = extensions
                    .get::<OtelData>()
                    .and_then(|data| Some((data.trace_id()?, data.span_id()?)));
                if let Some((trace_id, span_id)) = ids {
                    line.push(("trace_id".into(), trace_id.to_string().into()));
                    line.push(("span_id".into(), span_id.to_string().into()));
                    break;
                }
            }
        }
        for (name, value) in fields.0 {
            if !line.iter().any(|(taken, _)| *taken == name) {
                line.push((name, value));
            }
        }
        writer.write_char('{')?;
        for (index, (name, value)) in line.iter().enumerate() {
            if index > 0 {
                writer.write_char(',')?;
            }
            let name = serde_json::to_string(name).map_err(|_| fmt::Error)?;
            let value = serde_json::to_string(value).map_err(|_| fmt::Error)?;
            write!(writer, "{name}:{value}")?;
        }
        writeln!(writer, "}}")
    }
}

/// Keeps nothing of a span's fields: [`JsonLines`] writes a span's name
/// and ids, which need no formatting, and formatting the fields of every
/// span would cost more than the line.
pub struct NoSpanFields;

impl<'writer> FormatFields<'writer> for NoSpanFields {
    fn format_fields<R: tracing_subscriber::field::RecordFields>(
        &self,
        _writer: Writer<'writer>,
        _fields: R,
    ) -> fmt::Result {
        Ok(())
    }
}

/// An event's fields as JSON values.
struct JsonFields(Map<String, Value>);

impl Visit for JsonFields {
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.0.insert(field.name().into(), value.into());
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.0.insert(field.name().into(), value.into());
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.0.insert(field.name().into(), value.into());
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.0.insert(field.name().into(), value.into());
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().into(), value.into());
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.0.insert(field.name().into(), value.to_string().into());
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.0
            .insert(field.name().into(), format!("{value:?}").into());
    }
}
