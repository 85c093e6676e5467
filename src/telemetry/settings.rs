//! `[telemetry]`: where spans go, how many are kept, how logs look.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// How log lines are written to stderr.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines (tracing's default format).
    #[default]
    Text,
    /// One JSON object per line, with `trace_id` and `span_id` inside a span.
    Json,
}

/// Tracing and logging settings (`[telemetry]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TelemetryConfig {
    /// OTLP/gRPC endpoint of an OpenTelemetry Collector (e.g.
    /// `http://otel-collector:4317`; plain gRPC, no TLS). No spans are made
    /// or exported when absent.
    pub otlp_endpoint: Option<String>,
    /// `service.name` of the exported spans.
    pub service_name: String,
    /// Share of traces recorded when the caller sent no sampling decision
    /// (0.0 to 1.0). A caller's decision in its `traceparent` is followed
    /// when `parent_based` is on.
    pub sampling_ratio: f64,
    /// Follow the caller's sampling decision (OpenTelemetry's `parentbased_*`
    /// samplers); off only by `OTEL_TRACES_SAMPLER=always_on|always_off|traceidratio`.
    pub parent_based: bool,
    /// More resource attributes (e.g. `deployment.environment.name`).
    pub resource_attributes: BTreeMap<String, String>,
    /// Log lines as text or JSON.
    pub log_format: LogFormat,
    /// Finished spans waiting for export; past this, new ones are dropped
    /// (and counted) rather than slowing anything down.
    pub max_queued_spans: usize,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        TelemetryConfig {
            otlp_endpoint: None,
            service_name: "outboxd".into(),
            sampling_ratio: 1.0,
            parent_based: true,
            resource_attributes: BTreeMap::new(),
            log_format: LogFormat::Text,
            max_queued_spans: 8_192,
        }
    }
}

// `sampling_ratio` is never NaN: validation refuses it.
impl Eq for TelemetryConfig {}

impl TelemetryConfig {
    /// Applies OpenTelemetry's standard environment variables
    /// (`OTEL_EXPORTER_OTLP_ENDPOINT`, `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`,
    /// `OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`,
    /// `OTEL_TRACES_SAMPLER`, `OTEL_TRACES_SAMPLER_ARG`) read through `var`.
    pub fn apply_env(&mut self, var: impl Fn(&str) -> Option<String>) -> Result<(), String> {
        let var = |name: &str| var(name).filter(|value| !value.trim().is_empty());
        if let Some(endpoint) =
            var("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").or_else(|| var("OTEL_EXPORTER_OTLP_ENDPOINT"))
        {
            self.otlp_endpoint = Some(endpoint.trim().to_owned());
        }
        if let Some(name) = var("OTEL_SERVICE_NAME") {
            self.service_name = name.trim().to_owned();
        }
        if let Some(attributes) = var("OTEL_RESOURCE_ATTRIBUTES") {
            for pair in attributes.split(',').filter(|pair| !pair.trim().is_empty()) {
                let (key, value) = pair.split_once('=').ok_or_else(|| {
                    format!("OTEL_RESOURCE_ATTRIBUTES: {pair:?} is not key=value")
                })?;
                self.resource_attributes
                    .insert(key.trim().to_owned(), value.trim().to_owned());
            }
        }
        let ratio = match var("OTEL_TRACES_SAMPLER_ARG") {
            Some(arg) => Some(arg.trim().parse::<f64>().map_err(|_| {
                format!("OTEL_TRACES_SAMPLER_ARG must be a number between 0 and 1, not {arg:?}")
            })?),
            None => None,
        };
        if let Some(sampler) = var("OTEL_TRACES_SAMPLER") {
            let (parent_based, ratio) = match sampler.trim() {
                "always_on" => (false, 1.0),
                "always_off" => (false, 0.0),
                "traceidratio" => (false, ratio.unwrap_or(1.0)),
                "parentbased_always_on" => (true, 1.0),
                "parentbased_always_off" => (true, 0.0),
                "parentbased_traceidratio" => (true, ratio.unwrap_or(1.0)),
                other => {
                    return Err(format!(
                        "OTEL_TRACES_SAMPLER {other:?} is not supported (always_on, always_off, \
                         traceidratio, parentbased_always_on, parentbased_always_off, \
                         parentbased_traceidratio)"
                    ));
                }
            };
            self.parent_based = parent_based;
            self.sampling_ratio = ratio;
        } else if let Some(ratio) = ratio {
            self.sampling_ratio = ratio;
        }
        Ok(())
    }

    /// Why these settings cannot be used, if they cannot.
    pub fn validate(&self) -> Result<(), String> {
        if !(0.0..=1.0).contains(&self.sampling_ratio) {
            return Err("telemetry.sampling_ratio must be between 0.0 and 1.0".into());
        }
        // The exporter is built without TLS: spans go to a collector next
        // to outboxd (an agent or sidecar), which forwards them further.
        if let Some(endpoint) = &self.otlp_endpoint
            && !endpoint.starts_with("http://")
        {
            return Err(
                "telemetry.otlp_endpoint must be an http:// URL of an OTLP/gRPC receiver \
                 (TLS to the collector is not supported: run one beside outboxd)"
                    .into(),
            );
        }
        if self.service_name.trim().is_empty() {
            return Err("telemetry.service_name must not be empty".into());
        }
        if self.max_queued_spans == 0 {
            return Err("telemetry.max_queued_spans must be positive".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env<'a>(pairs: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |name| {
            pairs
                .iter()
                .find(|(key, _)| *key == name)
                .map(|(_, value)| (*value).to_owned())
        }
    }

    #[test]
    fn off_by_default() {
        let mut config = TelemetryConfig::default();
        config.apply_env(env(&[])).unwrap();
        assert_eq!(config.otlp_endpoint, None);
        assert_eq!(config.service_name, "outboxd");
        assert!(config.parent_based);
        config.validate().unwrap();
    }

    #[test]
    fn standard_environment_variables() {
        let mut config = TelemetryConfig::default();
        config
            .apply_env(env(&[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4317"),
                ("OTEL_SERVICE_NAME", "outboxd-eu"),
                ("OTEL_TRACES_SAMPLER", "parentbased_traceidratio"),
                ("OTEL_TRACES_SAMPLER_ARG", "0.25"),
                (
                    "OTEL_RESOURCE_ATTRIBUTES",
                    "deployment.environment.name=prod, team=orders",
                ),
            ]))
            .unwrap();
        assert_eq!(
            config.otlp_endpoint.as_deref(),
            Some("http://collector:4317")
        );
        assert_eq!(config.service_name, "outboxd-eu");
        assert_eq!(config.sampling_ratio, 0.25);
        assert!(config.parent_based);
        assert_eq!(config.resource_attributes["team"], "orders");
        assert_eq!(
            config.resource_attributes["deployment.environment.name"],
            "prod"
        );

        let mut config = TelemetryConfig::default();
        config
            .apply_env(env(&[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://a:4317"),
                ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://b:4317"),
                ("OTEL_TRACES_SAMPLER", "always_off"),
            ]))
            .unwrap();
        assert_eq!(config.otlp_endpoint.as_deref(), Some("http://b:4317"));
        assert!(!config.parent_based);
        assert_eq!(config.sampling_ratio, 0.0);
    }

    #[test]
    fn refuses_what_it_cannot_use() {
        let mut config = TelemetryConfig::default();
        assert!(
            config
                .apply_env(env(&[("OTEL_TRACES_SAMPLER", "jaeger_remote")]))
                .is_err()
        );
        assert!(
            config
                .apply_env(env(&[("OTEL_TRACES_SAMPLER_ARG", "half")]))
                .is_err()
        );
        config.sampling_ratio = 1.5;
        assert!(config.validate().unwrap_err().contains("sampling_ratio"));
        config.sampling_ratio = 1.0;
        config.otlp_endpoint = Some("collector:4317".into());
        assert!(config.validate().unwrap_err().contains("otlp_endpoint"));
    }
}
