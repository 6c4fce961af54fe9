//! The daemon's Prometheus metrics (prometheus-client), exposed at `GET /metrics`.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// Labels of the request counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    /// `stop`, `length`, `content_filter`, `cancelled`, `rejected`, `busy`, `invalid`, `error`.
    pub outcome: String,
}

/// Every metric the daemon exports.
pub struct Metrics {
    registry: Registry,
    /// Requests by outcome.
    pub requests: Family<OutcomeLabels, Counter>,
    /// Prompt tokens received (cached ones included).
    pub prompt_tokens: Counter,
    /// Prompt tokens taken from the prompt cache.
    pub cached_prompt_tokens: Counter,
    /// Tokens generated.
    pub generated_tokens: Counter,
    /// Requests waiting for a sequence.
    pub queue_length: Gauge,
    /// Sequences being processed.
    pub active_sequences: Gauge,
    /// Requests that continued from a prompt-cache entry.
    pub prompt_cache_hits: Counter,
    /// Requests that found no usable prompt-cache entry.
    pub prompt_cache_misses: Counter,
    /// Seconds from admission to the first generated token.
    pub time_to_first_token: Histogram,
    /// Seconds of one engine step.
    pub step_latency: Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    /// A registry with every metric registered, all zero.
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("mistrald");
        let requests = Family::<OutcomeLabels, Counter>::default();
        registry.register("requests", "Requests by outcome", requests.clone());
        let prompt_tokens = Counter::default();
        registry.register(
            "prompt_tokens",
            "Prompt tokens received (cached ones included)",
            prompt_tokens.clone(),
        );
        let cached_prompt_tokens = Counter::default();
        registry.register(
            "cached_prompt_tokens",
            "Prompt tokens taken from the prompt cache",
            cached_prompt_tokens.clone(),
        );
        let generated_tokens = Counter::default();
        registry.register(
            "generated_tokens",
            "Tokens generated",
            generated_tokens.clone(),
        );
        let queue_length = Gauge::default();
        registry.register(
            "queue_length",
            "Requests waiting for a sequence",
            queue_length.clone(),
        );
        let active_sequences = Gauge::default();
        registry.register(
            "active_sequences",
            "Sequences being processed",
            active_sequences.clone(),
        );
        let prompt_cache_hits = Counter::default();
        registry.register(
            "prompt_cache_hits",
            "Requests that continued from a prompt-cache entry",
            prompt_cache_hits.clone(),
        );
        let prompt_cache_misses = Counter::default();
        registry.register(
            "prompt_cache_misses",
            "Requests that found no usable prompt-cache entry",
            prompt_cache_misses.clone(),
        );
        let time_to_first_token = Histogram::new(exponential_buckets(0.005, 2.0, 14));
        registry.register(
            "time_to_first_token_seconds",
            "Seconds from admission to the first generated token",
            time_to_first_token.clone(),
        );
        let step_latency = Histogram::new(exponential_buckets(0.001, 2.0, 14));
        registry.register(
            "step_latency_seconds",
            "Seconds of one engine step",
            step_latency.clone(),
        );
        Metrics {
            registry,
            requests,
            prompt_tokens,
            cached_prompt_tokens,
            generated_tokens,
            queue_length,
            active_sequences,
            prompt_cache_hits,
            prompt_cache_misses,
            time_to_first_token,
            step_latency,
        }
    }

    /// Counts one request with `outcome`.
    pub fn count_request(&self, outcome: &str) {
        self.requests
            .get_or_create(&OutcomeLabels {
                outcome: outcome.to_string(),
            })
            .inc();
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}
