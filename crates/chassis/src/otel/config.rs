//! `OTEL_*`: whether a service exports its spans, where to, and how.
//!
//! The OpenTelemetry specification names the variables every SDK reads
//! (endpoint, protocol, timeout, resource, sampler, batch processor), so an
//! operator configures a chassis service as any other instrumented program.
//! The SDK crates read some of them on their own, each with its own
//! defaults and precedence, straight from the process environment and
//! without reporting a bad value. [`TraceSettings::read`] reads them all
//! here instead, through the chassis' [`Reader`]: a test passes a fixed
//! [`Env`](crate::config::Env), and a bad value is one more configuration
//! problem, listed with the others at start-up (exit 78), never a silent
//! fallback.
//!
//! Nothing is exported unless an endpoint is set: the SDK's default
//! (`http://localhost:4318`) would have every service send to a collector
//! that is usually not there, and pay for spans nobody reads.

use std::{fmt, str::FromStr, time::Duration};

use crate::env::{Reader, Secret};

/// `OTEL_EXPORTER_OTLP_TIMEOUT`'s default, as in the specification.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
/// `OTEL_BSP_MAX_QUEUE_SIZE`'s default, as in the specification.
const DEFAULT_QUEUE: usize = 2048;
/// `OTEL_BSP_MAX_EXPORT_BATCH_SIZE`'s default, as in the specification.
const DEFAULT_BATCH: usize = 512;
/// `OTEL_BSP_SCHEDULE_DELAY`'s default; the specification's is 5000 ms (see
/// the table on [`TraceSettings`] for why the chassis waits less).
const DEFAULT_DELAY: Duration = Duration::from_millis(1000);
/// The largest queue: its slots are allocated when the pipeline starts.
const MAX_QUEUE: usize = 65_536;
/// The longest timeout or delay: an hour is already no bound in practice.
const MAX_MILLIS: u64 = 3_600_000;
/// The only protocol this build speaks.
const HTTP_PROTOBUF: &str = "http/protobuf";
/// The path the OTLP/HTTP specification appends to a base endpoint.
const TRACES_PATH: &str = "/v1/traces";

/// What a service exports, read from the standard `OTEL_*` variables.
///
/// | variable | default | meaning |
/// |---|---|---|
/// | `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` | none | the URL spans are posted to, used as given; wins over the next |
/// | `OTEL_EXPORTER_OTLP_ENDPOINT` | none | the collector's base URL; spans go to `<base>/v1/traces` |
/// | `OTEL_EXPORTER_OTLP_TRACES_PROTOCOL`, `OTEL_EXPORTER_OTLP_PROTOCOL` | `http/protobuf` | the only one supported; `grpc` and `http/json` are problems |
/// | `OTEL_EXPORTER_OTLP_TRACES_TIMEOUT`, `OTEL_EXPORTER_OTLP_TIMEOUT` | `10000` | milliseconds one export request may take, connection included |
/// | `OTEL_EXPORTER_OTLP_TRACES_COMPRESSION`, `OTEL_EXPORTER_OTLP_COMPRESSION` | `none` | only `none` is supported |
/// | `OTEL_EXPORTER_OTLP_TRACES_HEADERS`, `OTEL_EXPORTER_OTLP_HEADERS` | none | `key=value,…` (percent-encoded) sent with every export, e.g. a collector's API key; never printed |
/// | `OTEL_SERVICE_NAME` | the service's name | the resource's `service.name` |
/// | `OTEL_RESOURCE_ATTRIBUTES` | none | `key=value,…` (percent-encoded) added to the resource; they override the chassis' own (`service.version`, `service.instance.id`), `OTEL_SERVICE_NAME` overrides them |
/// | `OTEL_TRACES_SAMPLER` | `parentbased_traceidratio` | `always_on`, `always_off`, `traceidratio`, `parentbased_always_on`, `parentbased_always_off`, `parentbased_traceidratio` |
/// | `OTEL_TRACES_SAMPLER_ARG` | `1.0` | the ratio of the `traceidratio` samplers, `0` to `1` |
/// | `OTEL_SDK_DISABLED` | `false` | `true` exports nothing |
/// | `OTEL_TRACES_EXPORTER` | `otlp` | `none` exports nothing |
/// | `OTEL_BSP_MAX_QUEUE_SIZE` | `2048` | finished spans waiting for export; more are dropped (counted); at most 65536, as its slots (about 360 bytes each) are allocated when tracing starts |
/// | `OTEL_BSP_MAX_EXPORT_BATCH_SIZE` | `512` | spans per export request; at most the queue size |
/// | `OTEL_BSP_SCHEDULE_DELAY` | `1000` | milliseconds between exports when fewer than a batch are waiting |
///
/// Where a variable has a `TRACES_` form, that form wins and the other is
/// then not read. An empty variable counts as unset, as the specification
/// says. Every endpoint is `http://` or `https://`; `https://` goes through
/// the chassis' outbound TLS (the platform's roots plus
/// `CHASSIS_TLS_CA_FILE`, see `tls`) and needs the `tls` feature.
///
/// The schedule delay defaults to 1 s where the specification says 5 s.
/// Under load a batch fills long before either, so the delay only decides
/// how long the spans of a quiet service wait: one second lets a trace be
/// looked at while the request is still on the operator's mind (and in a
/// test's patience), at the cost of one small request a second from a
/// service that is almost idle, and a process that dies without shutting
/// down loses a second of spans rather than five.
///
/// The exporter also adds the `…_HEADERS` variables of the process
/// environment to its requests by itself; they are read here too, so that
/// a malformed one is reported and an [`Env`](crate::config::Env) made for a
/// test carries its own. `OTEL_BSP_EXPORT_TIMEOUT` is not read: the export
/// timeout above bounds every export.
///
/// ```
/// use chassis::config::{Env, Reader};
/// use chassis::otel::{Sampler, TraceSettings};
///
/// let env = Env::from_pairs([
///     ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318"),
///     ("OTEL_TRACES_SAMPLER", "parentbased_traceidratio"),
///     ("OTEL_TRACES_SAMPLER_ARG", "0.25"),
/// ]);
/// let mut r = Reader::new(&env);
/// let settings = TraceSettings::read(&mut r);
/// r.finish().unwrap();
/// assert!(settings.exports());
/// assert_eq!(settings.endpoint(), Some("http://127.0.0.1:4318/v1/traces"));
/// assert_eq!(settings.sampler(), Sampler::ParentBasedTraceIdRatio(0.25));
///
/// // Every problem at once, with the others of the service.
/// let env = Env::from_pairs([
///     ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
///     ("OTEL_TRACES_SAMPLER_ARG", "2"),
/// ]);
/// let mut r = Reader::new(&env);
/// let _ = TraceSettings::read(&mut r);
/// let err = r.finish().unwrap_err();
/// assert_eq!(err.problems().len(), 2);
/// assert!(err.to_string().contains("http/protobuf"));
/// ```
#[derive(Clone, PartialEq)]
pub struct TraceSettings {
    endpoint: Option<String>,
    disabled: bool,
    timeout: Duration,
    headers: Vec<(String, Secret<String>)>,
    service_name: Option<String>,
    resource_attributes: Vec<(String, String)>,
    sampler: Sampler,
    max_queue_size: usize,
    max_export_batch_size: usize,
    schedule_delay: Duration,
}

/// Which traces are recorded, from `OTEL_TRACES_SAMPLER` and
/// `OTEL_TRACES_SAMPLER_ARG`.
///
/// A ratio decides from the trace id alone, so every service that sees a
/// trace takes the same decision for it; the `ParentBased` samplers follow
/// the caller's sampled flag (`traceparent`) instead, and use the ratio for
/// a trace they start.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Sampler {
    /// `always_on`: every trace.
    AlwaysOn,
    /// `always_off`: none.
    AlwaysOff,
    /// `traceidratio`: this share of traces (`0.0` to `1.0`), whatever the
    /// caller decided.
    TraceIdRatio(f64),
    /// `parentbased_always_on`: what the caller decided; every trace this
    /// service starts.
    ParentBasedAlwaysOn,
    /// `parentbased_always_off`: what the caller decided; none of the
    /// traces this service starts.
    ParentBasedAlwaysOff,
    /// `parentbased_traceidratio` (the default, with ratio `1.0`): what the
    /// caller decided; this share of the traces this service starts.
    ParentBasedTraceIdRatio(f64),
}

// === impl TraceSettings ===

impl fmt::Debug for TraceSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Header values are secrets; their names are not.
        let headers: Vec<&str> = self.headers.iter().map(|(k, _)| k.as_str()).collect();
        f.debug_struct("TraceSettings")
            .field("endpoint", &self.endpoint)
            .field("disabled", &self.disabled)
            .field("timeout", &self.timeout)
            .field("headers", &headers)
            .field("service_name", &self.service_name)
            .field("resource_attributes", &self.resource_attributes)
            .field("sampler", &self.sampler)
            .field("max_queue_size", &self.max_queue_size)
            .field("max_export_batch_size", &self.max_export_batch_size)
            .field("schedule_delay", &self.schedule_delay)
            .finish()
    }
}

impl Default for TraceSettings {
    fn default() -> Self {
        Self::off()
    }
}

impl TraceSettings {
    /// Reads the `OTEL_*` variables of the table above. Every problem is
    /// recorded in `r`, none stops the reading: the caller's
    /// [`Reader::finish`] lists them with the rest of the configuration.
    pub fn read(r: &mut Reader<'_>) -> Self {
        let disabled = read_disabled(r);
        let exporter_none = read_exporter_none(r);
        let endpoint = read_endpoint(r);
        check_protocol(r);
        const TIMEOUT: &str = "milliseconds an export request may take";
        let timeout = pick(
            r,
            "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT",
            "OTEL_EXPORTER_OTLP_TIMEOUT",
            TIMEOUT,
        );
        let timeout = millis(r, timeout, DEFAULT_TIMEOUT, TIMEOUT);
        check_compression(r);
        let headers = read_headers(r);
        let service_name = text(r, "OTEL_SERVICE_NAME", "the service's name in traces");
        let resource_attributes = read_resource_attributes(r);
        let sampler = read_sampler(r);
        let (max_queue_size, max_export_batch_size) = read_sizes(r);
        const DELAY: &str = "milliseconds between exports of a partial batch";
        let delay = (
            "OTEL_BSP_SCHEDULE_DELAY",
            text(r, "OTEL_BSP_SCHEDULE_DELAY", DELAY),
        );
        let schedule_delay = millis(r, delay, DEFAULT_DELAY, DELAY);
        Self {
            endpoint,
            disabled: disabled || exporter_none,
            timeout,
            headers,
            service_name,
            resource_attributes,
            sampler,
            max_queue_size,
            max_export_batch_size,
            schedule_delay,
        }
    }

    /// Settings that export nothing (the defaults, without an endpoint).
    pub fn off() -> Self {
        Self {
            endpoint: None,
            disabled: false,
            timeout: DEFAULT_TIMEOUT,
            headers: Vec::new(),
            service_name: None,
            resource_attributes: Vec::new(),
            sampler: Sampler::ParentBasedTraceIdRatio(1.0),
            max_queue_size: DEFAULT_QUEUE,
            max_export_batch_size: DEFAULT_BATCH,
            schedule_delay: DEFAULT_DELAY,
        }
    }

    /// Whether spans are exported: an endpoint is set, and neither
    /// `OTEL_SDK_DISABLED=true` nor `OTEL_TRACES_EXPORTER=none`.
    pub fn exports(&self) -> bool {
        self.endpoint.is_some() && !self.disabled
    }

    /// The sampler.
    pub fn sampler(&self) -> Sampler {
        self.sampler
    }

    /// The URL spans are posted to (`…/v1/traces`), when one is set.
    pub fn endpoint(&self) -> Option<&str> {
        self.endpoint.as_deref()
    }

    /// How long one export request may take, connection included.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// The names of the headers sent with every export (their values are
    /// secrets, kept inside).
    pub fn header_names(&self) -> impl Iterator<Item = &str> {
        self.headers.iter().map(|(k, _)| k.as_str())
    }

    /// `OTEL_SERVICE_NAME`, when set.
    pub fn service_name(&self) -> Option<&str> {
        self.service_name.as_deref()
    }

    /// `OTEL_RESOURCE_ATTRIBUTES`, decoded, in order.
    pub fn resource_attributes(&self) -> &[(String, String)] {
        &self.resource_attributes
    }

    /// How many finished spans may wait for export.
    pub fn max_queue_size(&self) -> usize {
        self.max_queue_size
    }

    /// How many spans one export request carries at most.
    pub fn max_export_batch_size(&self) -> usize {
        self.max_export_batch_size
    }

    /// How long spans wait for a batch to fill before they are sent anyway.
    pub fn schedule_delay(&self) -> Duration {
        self.schedule_delay
    }

    /// The headers, names with their raw (still percent-encoded) values.
    pub(crate) fn headers(&self) -> &[(String, Secret<String>)] {
        &self.headers
    }
}

// === impl Sampler ===

impl Sampler {
    /// The share of the traces this service starts (those without a
    /// sampled or unsampled parent) that are recorded.
    pub fn root_ratio(&self) -> f64 {
        match *self {
            Self::AlwaysOn | Self::ParentBasedAlwaysOn => 1.0,
            Self::AlwaysOff | Self::ParentBasedAlwaysOff => 0.0,
            Self::TraceIdRatio(r) | Self::ParentBasedTraceIdRatio(r) => r,
        }
    }

    /// Whether a parent's sampled flag decides for its children.
    pub fn follows_parent(&self) -> bool {
        matches!(
            self,
            Self::ParentBasedAlwaysOn
                | Self::ParentBasedAlwaysOff
                | Self::ParentBasedTraceIdRatio(_)
        )
    }

    /// The same decision as the SDK's sampler, for the tracer provider
    /// handed to handler code.
    pub(crate) fn to_sdk(self) -> opentelemetry_sdk::trace::Sampler {
        use opentelemetry_sdk::trace::Sampler as S;
        let root = match self {
            Self::AlwaysOn | Self::ParentBasedAlwaysOn => S::AlwaysOn,
            Self::AlwaysOff | Self::ParentBasedAlwaysOff => S::AlwaysOff,
            Self::TraceIdRatio(r) | Self::ParentBasedTraceIdRatio(r) => S::TraceIdRatioBased(r),
        };
        if self.follows_parent() {
            S::ParentBased(Box::new(root))
        } else {
            root
        }
    }
}

// === reading ===

/// `name`'s value, `None` when unset or empty (the specification treats
/// both alike) or not UTF-8 (recorded).
fn text(r: &mut Reader<'_>, name: &str, description: &str) -> Option<String> {
    r.maybe::<String>(name, description)
        .map(|v| v.trim().to_owned())
        .filter(|v| !v.is_empty())
}

/// The first of `specific` and `general` that is set (not empty), with
/// its name.
fn pick<'n>(
    r: &mut Reader<'_>,
    specific: &'n str,
    general: &'n str,
    description: &str,
) -> (&'n str, Option<String>) {
    match text(r, specific, description) {
        Some(v) => (specific, Some(v)),
        None => (general, text(r, general, description)),
    }
}

/// `value` of `name` parsed as `T`; a problem, worded as the reader's,
/// when it does not parse.
fn parse<T>(r: &mut Reader<'_>, name: &str, value: &str, description: &str) -> Option<T>
where
    T: FromStr,
    T::Err: fmt::Display,
{
    match value.parse::<T>() {
        Ok(v) => Some(v),
        Err(e) => {
            r.problem(
                name,
                format!("invalid value `{}` ({description}): {e}", shown(value)),
            );
            None
        }
    }
}

/// Whole milliseconds, at least 1 and at most an hour.
struct Millis(u64);

impl FromStr for Millis {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.parse::<u64>() {
            Ok(0) => Err("must be at least 1".to_owned()),
            Ok(n) if n > MAX_MILLIS => Err(format!("more than an hour ({MAX_MILLIS} ms)")),
            Ok(n) => Ok(Self(n)),
            Err(e) => Err(format!("expected whole milliseconds: {e}")),
        }
    }
}

fn millis(
    r: &mut Reader<'_>,
    (name, value): (&str, Option<String>),
    default: Duration,
    description: &str,
) -> Duration {
    value
        .and_then(|v| parse::<Millis>(r, name, &v, description))
        .map_or(default, |m| Duration::from_millis(m.0))
}

/// A count of spans, at least 1 and at most [`MAX_QUEUE`].
struct Count(usize);

impl FromStr for Count {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.parse::<usize>() {
            Ok(0) => Err("must be at least 1".to_owned()),
            Ok(n) if n > MAX_QUEUE => Err(format!(
                "more than {MAX_QUEUE} (the queue is allocated when tracing starts)"
            )),
            Ok(n) => Ok(Self(n)),
            Err(e) => Err(format!("expected a whole number of spans: {e}")),
        }
    }
}

fn read_sizes(r: &mut Reader<'_>) -> (usize, usize) {
    const QUEUE: &str = "OTEL_BSP_MAX_QUEUE_SIZE";
    const BATCH: &str = "OTEL_BSP_MAX_EXPORT_BATCH_SIZE";
    const QUEUE_TEXT: &str = "spans waiting for export";
    const BATCH_TEXT: &str = "spans per export request";
    let queue = text(r, QUEUE, QUEUE_TEXT)
        .and_then(|v| parse::<Count>(r, QUEUE, &v, QUEUE_TEXT))
        .map_or(DEFAULT_QUEUE, |c| c.0);
    let batch = text(r, BATCH, BATCH_TEXT).and_then(|v| parse::<Count>(r, BATCH, &v, BATCH_TEXT));
    match batch {
        Some(Count(b)) if b > queue => {
            r.problem(
                BATCH,
                format!("{b} is more than {QUEUE} ({queue}): a batch is taken from the queue"),
            );
            (queue, queue)
        }
        Some(Count(b)) => (queue, b),
        // The default batch shrinks to a smaller queue on its own.
        None => (queue, DEFAULT_BATCH.min(queue)),
    }
}

fn read_disabled(r: &mut Reader<'_>) -> bool {
    const NAME: &str = "OTEL_SDK_DISABLED";
    match text(r, NAME, "true turns tracing off") {
        None => false,
        Some(v) if v.eq_ignore_ascii_case("true") => true,
        Some(v) if v.eq_ignore_ascii_case("false") => false,
        Some(v) => {
            r.problem(
                NAME,
                format!("invalid value `{}`: expected `true` or `false`", shown(&v)),
            );
            false
        }
    }
}

/// Whether `OTEL_TRACES_EXPORTER` is `none`.
fn read_exporter_none(r: &mut Reader<'_>) -> bool {
    const NAME: &str = "OTEL_TRACES_EXPORTER";
    let Some(v) = text(r, NAME, "otlp or none") else {
        return false;
    };
    let mut otlp = false;
    let mut none = false;
    for item in v.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        match item {
            "otlp" => otlp = true,
            "none" => none = true,
            other => r.problem(
                NAME,
                format!(
                    "`{}` is not supported: the chassis exports spans over OTLP; use `otlp`, or `none` to export nothing",
                    shown(other)
                ),
            ),
        }
    }
    none && !otlp
}

/// The traces endpoint: the signal's own variable verbatim, else the base
/// URL with `/v1/traces` appended.
fn read_endpoint(r: &mut Reader<'_>) -> Option<String> {
    const TRACES: &str = "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT";
    const BASE: &str = "OTEL_EXPORTER_OTLP_ENDPOINT";
    if let Some(url) = text(r, TRACES, "URL spans are posted to") {
        return check_url(r, TRACES, url);
    }
    let base = text(r, BASE, "base URL of the OTLP collector")?;
    let url = format!("{}{TRACES_PATH}", base.trim_end_matches('/'));
    check_url(r, BASE, url)
}

fn check_url(r: &mut Reader<'_>, name: &str, url: String) -> Option<String> {
    let uri = match url.parse::<http::Uri>() {
        Ok(uri) => uri,
        Err(e) => {
            r.problem(name, format!("`{}` is not a URL: {e}", shown(&url)));
            return None;
        }
    };
    if uri.host().is_none_or(str::is_empty) {
        r.problem(
            name,
            format!(
                "`{}` has no host: expected http://host:port or https://host:port",
                shown(&url)
            ),
        );
        return None;
    }
    match uri.scheme_str() {
        Some("http") => Some(url),
        Some("https") if cfg!(feature = "tls") => Some(url),
        Some("https") => {
            r.problem(
                name,
                "an https:// endpoint needs outbound TLS: enable the `tls` feature of service-chassis, or use http:// to a collector on loopback",
            );
            None
        }
        _ => {
            r.problem(
                name,
                format!("`{}` is neither http:// nor https://", shown(&url)),
            );
            None
        }
    }
}

fn check_protocol(r: &mut Reader<'_>) {
    let (name, value) = pick(
        r,
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
        "OTEL_EXPORTER_OTLP_PROTOCOL",
        HTTP_PROTOBUF,
    );
    match value.as_deref() {
        None | Some(HTTP_PROTOBUF) => {}
        Some(p @ ("grpc" | "http/json")) => r.problem(
            name,
            format!("`{p}` is not supported: the chassis exports OTLP over `{HTTP_PROTOBUF}` only (port 4318 on a collector); set `{HTTP_PROTOBUF}` or unset it"),
        ),
        Some(other) => r.problem(
            name,
            format!(
                "unknown protocol `{}`: the chassis exports OTLP over `{HTTP_PROTOBUF}` only",
                shown(other)
            ),
        ),
    }
}

fn check_compression(r: &mut Reader<'_>) {
    let (name, value) = pick(
        r,
        "OTEL_EXPORTER_OTLP_TRACES_COMPRESSION",
        "OTEL_EXPORTER_OTLP_COMPRESSION",
        "none",
    );
    match value.as_deref() {
        None | Some("none") => {}
        Some(other) => r.problem(
            name,
            format!(
                "`{}` is not supported: the chassis sends export requests uncompressed; set `none` or unset it",
                shown(other)
            ),
        ),
    }
}

fn read_headers(r: &mut Reader<'_>) -> Vec<(String, Secret<String>)> {
    const SPECIFIC: &str = "OTEL_EXPORTER_OTLP_TRACES_HEADERS";
    const GENERAL: &str = "OTEL_EXPORTER_OTLP_HEADERS";
    const HEADERS: &str = "key=value,... headers of export requests";
    // Read as secrets: a value that is not UTF-8 is reported without it.
    let mut read = |name| {
        r.maybe_secret(name, HEADERS)
            .filter(|v| !v.expose().trim().is_empty())
    };
    let (name, raw) = match read(SPECIFIC) {
        Some(v) => (SPECIFIC, v),
        None => match read(GENERAL) {
            Some(v) => (GENERAL, v),
            None => return Vec::new(),
        },
    };
    let mut headers = Vec::new();
    let mut bad = Vec::new();
    for (i, entry) in entries(raw.expose()).enumerate() {
        let Some((key, value)) = entry.split_once('=') else {
            bad.push(format!("entry {} has no `=`", i + 1));
            continue;
        };
        let key = key.trim();
        let decoded_key = percent_decode(key);
        let decoded_value = percent_decode(value.trim());
        match (decoded_key, decoded_value) {
            (Ok(k), Ok(v))
                if http::HeaderName::from_bytes(k.as_bytes()).is_ok()
                    && http::HeaderValue::from_str(&v).is_ok() =>
            {
                headers.push((k, Secret::new(value.trim().to_owned())));
            }
            (Ok(k), Ok(_)) if http::HeaderName::from_bytes(k.as_bytes()).is_ok() => {
                bad.push(format!(
                    "the value of `{}` is not a header value",
                    shown(&k)
                ));
            }
            _ => bad.push(format!("entry {} is not a header name=value", i + 1)),
        }
    }
    if !bad.is_empty() {
        r.problem(name, bad.join("; "));
    }
    headers
}

fn read_resource_attributes(r: &mut Reader<'_>) -> Vec<(String, String)> {
    const NAME: &str = "OTEL_RESOURCE_ATTRIBUTES";
    let Some(raw) = text(r, NAME, "key=value,... resource attributes") else {
        return Vec::new();
    };
    let mut attributes = Vec::new();
    let mut bad = Vec::new();
    for entry in entries(&raw) {
        let parsed = entry.split_once('=').and_then(|(k, v)| {
            let k = percent_decode(k.trim()).ok()?;
            let v = percent_decode(v.trim()).ok()?;
            (!k.is_empty()).then_some((k, v))
        });
        match parsed {
            Some(kv) => attributes.push(kv),
            None => bad.push(format!("`{}`", shown(entry))),
        }
    }
    if !bad.is_empty() {
        r.problem(
            NAME,
            format!(
                "not key=value with percent-encoded key and value: {}",
                bad.join(", ")
            ),
        );
    }
    attributes
}

fn read_sampler(r: &mut Reader<'_>) -> Sampler {
    const NAME: &str = "OTEL_TRACES_SAMPLER";
    const ARG: &str = "OTEL_TRACES_SAMPLER_ARG";
    const SAMPLERS: [&str; 6] = [
        "always_on",
        "always_off",
        "traceidratio",
        "parentbased_always_on",
        "parentbased_always_off",
        "parentbased_traceidratio",
    ];
    let name = text(r, NAME, "which traces are recorded");
    if let Some(other) = name.as_deref().filter(|n| !SAMPLERS.contains(n)) {
        r.problem(
            NAME,
            format!(
                "`{}` is not supported: expected {}",
                shown(other),
                SAMPLERS.join(", ")
            ),
        );
    }
    // Checked whenever it is set, used by the ratio samplers only.
    let ratio = match text(r, ARG, "sampling ratio, 0 to 1") {
        None => 1.0,
        Some(v) => match v.parse::<f64>() {
            Ok(x) if (0.0..=1.0).contains(&x) => x,
            _ => {
                r.problem(
                    ARG,
                    format!(
                        "invalid value `{}`: expected a ratio from 0 to 1, e.g. 0.25",
                        shown(&v)
                    ),
                );
                1.0
            }
        },
    };
    match name.as_deref() {
        Some("always_on") => Sampler::AlwaysOn,
        Some("always_off") => Sampler::AlwaysOff,
        Some("traceidratio") => Sampler::TraceIdRatio(ratio),
        Some("parentbased_always_on") => Sampler::ParentBasedAlwaysOn,
        Some("parentbased_always_off") => Sampler::ParentBasedAlwaysOff,
        // The default, and what an unknown one falls back to.
        _ => Sampler::ParentBasedTraceIdRatio(ratio),
    }
}

/// The comma-separated entries of a `key=value,…` list, empty ones skipped.
fn entries(list: &str) -> impl Iterator<Item = &str> {
    list.split(',').map(str::trim).filter(|e| !e.is_empty())
}

/// Strict percent-decoding: `%` must start two hex digits, and the result
/// must be UTF-8.
fn percent_decode(s: &str) -> Result<String, ()> {
    fn hex(b: u8) -> Option<u8> {
        match b {
            b'0'..=b'9' => Some(b - b'0'),
            b'a'..=b'f' => Some(b - b'a' + 10),
            b'A'..=b'F' => Some(b - b'A' + 10),
            _ => None,
        }
    }
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hi = bytes.get(i + 1).copied().and_then(hex).ok_or(())?;
            let lo = bytes.get(i + 2).copied().and_then(hex).ok_or(())?;
            out.push(hi << 4 | lo);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| ())
}

/// A value as a problem shows it: at most 64 characters, escaped.
fn shown(value: &str) -> String {
    value
        .chars()
        .take(64)
        .flat_map(char::escape_default)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percent_decoding_is_strict() {
        assert_eq!(percent_decode("a%20b%2Cc").unwrap(), "a b,c");
        assert_eq!(percent_decode("%C3%A9").unwrap(), "é");
        assert!(percent_decode("%zz").is_err());
        assert!(percent_decode("50%").is_err());
        assert!(percent_decode("%ff").is_err(), "not UTF-8");
    }

    #[cfg(not(feature = "tls"))]
    #[test]
    fn https_without_tls_is_a_problem_naming_the_feature() {
        let env = crate::env::Env::from_pairs([(
            "OTEL_EXPORTER_OTLP_ENDPOINT",
            "https://collector.example",
        )]);
        let mut r = Reader::new(&env);
        let settings = TraceSettings::read(&mut r);
        assert!(!settings.exports());
        let err = r.finish().unwrap_err();
        assert_eq!(err.problems().len(), 1);
        assert!(err.to_string().contains("`tls` feature"), "{err}");
    }

    #[test]
    fn samplers_map_to_the_sdk_alike() {
        for (s, ratio, parent) in [
            (Sampler::AlwaysOn, 1.0, false),
            (Sampler::AlwaysOff, 0.0, false),
            (Sampler::TraceIdRatio(0.5), 0.5, false),
            (Sampler::ParentBasedAlwaysOn, 1.0, true),
            (Sampler::ParentBasedAlwaysOff, 0.0, true),
            (Sampler::ParentBasedTraceIdRatio(0.1), 0.1, true),
        ] {
            assert_eq!(s.root_ratio(), ratio, "{s:?}");
            assert_eq!(s.follows_parent(), parent, "{s:?}");
            let sdk = format!("{:?}", s.to_sdk());
            assert_eq!(sdk.starts_with("ParentBased"), parent, "{sdk}");
        }
    }
}
