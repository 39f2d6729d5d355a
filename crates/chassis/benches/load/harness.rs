//! Runs the scenarios: each variant in its own process pinned to one core,
//! `wrk` pinned to the other, over loopback, variants interleaved per round.
//! Variants that export spans send them to the harness's own collector
//! ([`Collector`]).

use std::{
    fmt::Write as _,
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use jsonwebtoken::Algorithm;

use crate::{
    collector::{Collector, Received},
    tokens::{ACCOUNT, Signer},
    variants::{Kind, ServerSpec},
};

/// The path every request asks for.
pub(crate) fn ticket_path() -> String {
    format!("/ticketing/v1/{ACCOUNT}/tickets/42")
}

/// Settings of a run, from the command line.
#[derive(Debug, Clone)]
pub(crate) struct Options {
    pub(crate) secs: u64,
    pub(crate) warmup: u64,
    pub(crate) rounds: usize,
    pub(crate) connections: usize,
    pub(crate) scenarios: Vec<String>,
    pub(crate) write: bool,
    pub(crate) instructions: bool,
    pub(crate) server_cpu: String,
    pub(crate) load_cpu: String,
}

impl Options {
    pub(crate) fn parse(args: &[String]) -> Result<Self, String> {
        let mut o = Options {
            secs: 10,
            warmup: 2,
            rounds: 3,
            connections: 32,
            scenarios: vec!["cached".into(), "distinct".into(), "routes".into()],
            write: false,
            instructions: false,
            server_cpu: "0".into(),
            load_cpu: "1".into(),
        };
        let mut it = args.iter();
        while let Some(a) = it.next() {
            let mut value = |name: &str| {
                it.next()
                    .cloned()
                    .ok_or_else(|| format!("{name} needs a value"))
            };
            let number = |name: &str, v: String| {
                v.parse::<u64>()
                    .ok()
                    .filter(|n| *n > 0)
                    .ok_or_else(|| format!("{name} must be a positive number, not `{v}`"))
            };
            match a.as_str() {
                "--bench" => {}
                "--secs" => o.secs = number(a, value(a)?)?,
                "--warmup" => o.warmup = value(a)?.parse().map_err(|_| "--warmup: seconds")?,
                "--rounds" => o.rounds = number(a, value(a)?)? as usize,
                "--connections" => o.connections = number(a, value(a)?)? as usize,
                "--scenarios" => {
                    o.scenarios = value(a)?.split(',').map(str::to_owned).collect();
                    if let Some(s) = o.scenarios.iter().find(|s| scenario(s).is_none()) {
                        return Err(format!(
                            "unknown scenario `{s}` (cached, distinct, routes, tracing)"
                        ));
                    }
                    if !cfg!(feature = "otel") && o.scenarios.iter().any(|s| s == "tracing") {
                        return Err("the `tracing` scenario needs the `otel` feature".to_owned());
                    }
                }
                "--write" => o.write = true,
                "--instructions" => o.instructions = true,
                "--server-cpu" => o.server_cpu = value(a)?,
                "--load-cpu" => o.load_cpu = value(a)?,
                other => return Err(format!("unknown argument `{other}`")),
            }
        }
        Ok(o)
    }
}

/// One column of a scenario.
#[derive(Debug, Clone)]
struct Variant {
    label: &'static str,
    spec: ServerSpec,
    /// Span export to the harness's collector, at this root sampling ratio
    /// (`OTEL_TRACES_SAMPLER_ARG`); `None` configures none.
    otel: Option<f64>,
}

impl Variant {
    /// The variables that turn span export on, for a variant that asks.
    fn env(&self, collector: Option<&Collector>) -> Vec<(&'static str, String)> {
        let Some(ratio) = self.otel else {
            return Vec::new();
        };
        let collector = collector.expect("a scenario with exporting variants runs a collector");
        // The rest (sampler, batch sizes, schedule delay) keep their defaults.
        vec![
            ("OTEL_EXPORTER_OTLP_ENDPOINT", collector.endpoint()),
            ("OTEL_TRACES_SAMPLER_ARG", ratio.to_string()),
        ]
    }
}

/// What a scenario compares, and how its verdict is read.
struct Scenario {
    name: &'static str,
    title: &'static str,
    /// Tokens: one (`1`) or a pool drawn round-robin.
    tokens: usize,
    alg: Algorithm,
    variants: Vec<Variant>,
    /// Ratios to print per round: numerator, denominator and the target
    /// (`None`: for information).
    ratios: Vec<(&'static str, &'static str, Option<f64>)>,
}

impl Scenario {
    /// Whether some variant exports spans, so the collector must run.
    fn exports(&self) -> bool {
        self.variants.iter().any(|v| v.otel.is_some())
    }
}

fn v(
    label: &'static str,
    kind: Kind,
    routes: usize,
    alg: Algorithm,
    cache: Option<usize>,
) -> Variant {
    Variant {
        label,
        spec: ServerSpec {
            kind,
            routes,
            alg,
            cache,
        },
        otel: None,
    }
}

/// C with 10 routes and RS256, exporting its spans at root sampling `ratio`.
fn traced(label: &'static str, ratio: f64) -> Variant {
    Variant {
        otel: Some(ratio),
        ..v(label, Kind::Chassis, 10, Algorithm::RS256, None)
    }
}

/// C's cache in the `distinct` scenario: a tenth of the pool, so that
/// round-robin over the pool misses on every request and every miss also
/// pays for an insert and an eviction.
const DISTINCT_CACHE: usize = 1_000;
const POOL: usize = 10_000;

fn scenario(name: &str) -> Option<Scenario> {
    use Algorithm::{EdDSA, RS256};
    use Kind::{Bare, Chassis, Hand};
    Some(match name {
        "cached" => Scenario {
            name: "cached",
            title: "one token (C's cache hits), RS256, 10 routes",
            tokens: 1,
            alg: RS256,
            variants: vec![
                v("A", Bare, 10, RS256, None),
                v("B", Hand, 10, RS256, None),
                v("C", Chassis, 10, RS256, None),
            ],
            ratios: vec![("C", "A", Some(0.75)), ("C", "B", Some(3.0))],
        },
        "distinct" => Scenario {
            name: "distinct",
            title: "10,000 distinct EdDSA tokens round-robin (every request misses C's cache), 10 routes",
            tokens: POOL,
            alg: EdDSA,
            variants: vec![
                v("A", Bare, 10, EdDSA, None),
                v("B-EdDSA", Hand, 10, EdDSA, None),
                v("C", Chassis, 10, EdDSA, Some(DISTINCT_CACHE)),
            ],
            ratios: vec![("C", "B-EdDSA", Some(0.9))],
        },
        "routes" => Scenario {
            name: "routes",
            title: "1,000 routes against 10, one token (C's cache hits), RS256",
            tokens: 1,
            alg: RS256,
            variants: vec![
                v("A-1000", Bare, 1000, RS256, None),
                v("C-10", Chassis, 10, RS256, None),
                v("C-1000", Chassis, 1000, RS256, None),
            ],
            ratios: vec![
                ("C-1000", "C-10", Some(0.95)),
                ("C-1000", "A-1000", Some(0.75)),
            ],
        },
        "tracing" => Scenario {
            name: "tracing",
            title: "C with span export: none configured, configured with sampling off, every request sampled; RS256, one token, 10 routes",
            tokens: 1,
            alg: RS256,
            variants: vec![
                v("A", Bare, 10, RS256, None),
                v("C", Chassis, 10, RS256, None),
                traced("C-otel-off", 0.0),
                traced("C-otel-all", 1.0),
            ],
            ratios: vec![
                ("C-otel-off", "A", Some(0.76)),
                ("C-otel-all", "A", Some(0.60)),
                ("C-otel-off", "C", None),
                ("C-otel-all", "C", None),
            ],
        },
        _ => return None,
    })
}

/// One measured run of one variant.
#[derive(Debug, Clone, Default)]
struct Sample {
    rps: f64,
    requests: f64,
    p50_us: f64,
    p99_us: f64,
    errors: u64,
    /// Server CPU time (user + system, all its threads) per request.
    cpu_us: f64,
    idle_rss_mib: f64,
    peak_rss_mib: f64,
    /// Requests the server answered in all: the probe, the warm-up and the
    /// measured run.
    served: f64,
    /// What the collector received from this server, start to stop.
    received: Received,
    /// The server's own `otel_spans_exported_total` and
    /// `otel_spans_dropped_total` before it stopped (exporting variants).
    spans_exported: f64,
    spans_dropped: f64,
}

/// Runs every scenario and prints (and optionally writes) the report.
pub(crate) fn run(exe: &Path, o: &Options) -> Result<(), String> {
    let wrk = find_or_install_wrk()?;
    let pin = has("taskset") && std::thread::available_parallelism().map_or(1, |n| n.get()) >= 2;
    if !pin {
        println!("note: taskset or a second core is missing; processes are not pinned");
    }
    let dir = std::env::temp_dir().join(format!("chassis-load-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let started = Instant::now();
    let mut report = String::new();
    for name in &o.scenarios {
        let s = scenario(name).expect("validated");
        println!("\n== scenario `{}`: {}", s.name, s.title);
        let script = write_script(&dir, &s)?;
        // In the harness process, which is not pinned: its thread goes on
        // the load generator's core, away from the server's.
        let collector = if s.exports() {
            let c = Collector::start(pin.then_some(o.load_cpu.as_str()))?;
            println!("collector at {} ({})", c.endpoint(), c.placement);
            Some(c)
        } else {
            None
        };
        let mut rounds: Vec<Vec<Sample>> = Vec::new();
        for round in 1..=o.rounds {
            let mut samples = Vec::new();
            for variant in &s.variants {
                let sample = measure(exe, &wrk, pin, o, variant, &script, collector.as_ref())?;
                println!(
                    "round {round} {:<10} {:>9.0} req/s  CPU {:>5.1} µs/req  p50 {:>7.0} µs  p99 {:>7.0} µs  errors {}  RSS idle {:.1} MiB, peak {:.1} MiB",
                    variant.label,
                    sample.rps,
                    sample.cpu_us,
                    sample.p50_us,
                    sample.p99_us,
                    sample.errors,
                    sample.idle_rss_mib,
                    sample.peak_rss_mib
                );
                if collector.is_some() {
                    println!(
                        "                   collector: {} export requests, {} bytes; spans exported {:.0}, dropped {:.0} (server's counts); {:.0} requests served",
                        sample.received.requests,
                        sample.received.bytes,
                        sample.spans_exported,
                        sample.spans_dropped,
                        sample.served,
                    );
                }
                samples.push(sample);
            }
            let line = s
                .ratios
                .iter()
                .map(|(n, d, _)| format!("{n}/{d} {:.2}", ratio(&s, &samples, n, d)))
                .collect::<Vec<_>>()
                .join(", ");
            println!("round {round} ratios: {line}");
            rounds.push(samples);
        }
        report.push_str(&table(
            &s,
            &rounds,
            collector.as_ref().map(|c| c.placement.as_str()),
        ));
    }
    let _ = std::fs::remove_dir_all(&dir);
    let command = command_line(o);
    let header = format!(
        "Measured {} on {}, {} cores, {} GiB RAM, Linux {}; {}; every variant pinned to core {} with one tokio worker, wrk pinned to core {} with {} connections; {} s per run after {} s of warm-up, {} rounds; {:.0} min in all.\n\nCommand: `{command}`\n\n",
        today(),
        cpu_model(),
        std::thread::available_parallelism().map_or(1, |n| n.get()),
        mem_gib(),
        kernel(),
        wrk_version(&wrk),
        o.server_cpu,
        o.load_cpu,
        o.connections,
        o.secs,
        o.warmup,
        o.rounds,
        started.elapsed().as_secs_f64() / 60.0,
    );
    let full = format!("{header}{report}");
    println!("\n{full}");
    if o.write {
        let doc = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/benchmarks.md");
        write_section(&doc, &full)?;
        println!("written to {}", doc.display());
    }
    Ok(())
}

fn command_line(o: &Options) -> String {
    let mut c = "cargo bench -p service-chassis --bench load --".to_owned();
    let _ = write!(
        c,
        " --secs {} --warmup {} --rounds {} --connections {} --scenarios {}",
        o.secs,
        o.warmup,
        o.rounds,
        o.connections,
        o.scenarios.join(",")
    );
    if o.write {
        c.push_str(" --write");
    }
    c
}

fn ratio(s: &Scenario, samples: &[Sample], n: &str, d: &str) -> f64 {
    let at = |l: &str| {
        s.variants
            .iter()
            .position(|v| v.label == l)
            .map(|i| &samples[i])
            .expect("a ratio names variants of its scenario")
    };
    at(n).rps / at(d).rps
}

fn cpu(s: &Scenario, samples: &[Sample], label: &str) -> f64 {
    let i = s
        .variants
        .iter()
        .position(|v| v.label == label)
        .expect("a ratio names variants of its scenario");
    samples[i].cpu_us
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    let n = xs.len();
    if n % 2 == 1 {
        xs[n / 2]
    } else {
        (xs[n / 2 - 1] + xs[n / 2]) / 2.0
    }
}

/// The scenario's table and verdicts; `collector` says where the collector
/// ran, when one did.
fn table(s: &Scenario, rounds: &[Vec<Sample>], collector: Option<&str>) -> String {
    let mut t = format!(
        "#### Scenario `{}`: {}\n\n| variant | req/s (per round) | server CPU µs/request | p50 µs | p99 µs | non-2xx | idle RSS MiB | peak RSS MiB |\n|---|---|---|---|---|---|---|---|\n",
        s.name, s.title
    );
    for (i, v) in s.variants.iter().enumerate() {
        let col = |f: fn(&Sample) -> f64| median(rounds.iter().map(|r| f(&r[i])).collect());
        let per_round = rounds
            .iter()
            .map(|r| format!("{:.0}", r[i].rps))
            .collect::<Vec<_>>()
            .join(" / ");
        let _ = writeln!(
            t,
            "| {} | {per_round} | {:.1} | {:.0} | {:.0} | {} | {:.1} | {:.1} |",
            v.label,
            col(|x| x.cpu_us),
            col(|x| x.p50_us),
            col(|x| x.p99_us),
            rounds.iter().map(|r| r[i].errors).sum::<u64>(),
            col(|x| x.idle_rss_mib),
            col(|x| x.peak_rss_mib),
        );
    }
    t.push('\n');
    for (n, d, target) in &s.ratios {
        let per: Vec<f64> = rounds.iter().map(|r| ratio(s, r, n, d)).collect();
        let m = median(per.clone());
        let _ = writeln!(
            t,
            "- {n}/{d} in requests/s: {} per round, median {m:.2}; {}. Server CPU per request, {n} − {d}: {:.1} µs (median of rounds)",
            per.iter()
                .map(|x| format!("{x:.2}"))
                .collect::<Vec<_>>()
                .join(", "),
            verdict(m, *target),
            median(rounds.iter().map(|r| cpu(s, r, n) - cpu(s, r, d)).collect()),
        );
        // What the ratio of rates would be with each server's one core
        // saturated: steadier than the rates when the load generator's
        // core is disturbed too.
        let by_cpu = median(rounds.iter().map(|r| cpu(s, r, d) / cpu(s, r, n)).collect());
        let _ = writeln!(
            t,
            "  - the same from server CPU per request ({d}'s over {n}'s): {by_cpu:.2}; {}",
            verdict(by_cpu, *target),
        );
    }
    if let Some(placement) = collector {
        let _ = writeln!(
            t,
            "\nWhat the collector (a thread of the harness process, {placement}) received from each server, start to stop, all rounds; spans by the server's own counters:\n\n| variant | requests served | export requests | bytes received | bytes per request served | spans exported | spans dropped |\n|---|---:|---:|---:|---:|---:|---:|"
        );
        for (i, v) in s.variants.iter().enumerate() {
            let mut received = Received::default();
            for r in rounds {
                received += r[i].received;
            }
            let sum = |f: fn(&Sample) -> f64| rounds.iter().map(|r| f(&r[i])).sum::<f64>();
            let served = sum(|x| x.served);
            let spans = |f: fn(&Sample) -> f64| {
                if v.otel.is_some() {
                    format!("{:.0}", sum(f))
                } else {
                    "—".to_owned()
                }
            };
            let _ = writeln!(
                t,
                "| {} | {served:.0} | {} | {} | {:.0} | {} | {} |",
                v.label,
                received.requests,
                received.bytes,
                received.bytes as f64 / served,
                spans(|x| x.spans_exported),
                spans(|x| x.spans_dropped),
            );
        }
    }
    if s.name == "cached" {
        let p99 = |l: &str| {
            let i = s
                .variants
                .iter()
                .position(|v| v.label == l)
                .expect("variant");
            median(rounds.iter().map(|r| r[i].p99_us).collect())
        };
        let r = p99("C") / p99("A");
        let _ = writeln!(
            t,
            "- C/A in p99 latency: {r:.2}; target ≤ 1.5: **{}**",
            if r <= 1.5 { "met" } else { "not met" }
        );
    }
    t.push('\n');
    t
}

/// `target ≥ x: **met**`, or that the ratio is for information.
fn verdict(x: f64, target: Option<f64>) -> String {
    match target {
        Some(t) if x >= t => format!("target ≥ {t}: **met**"),
        Some(t) => format!("target ≥ {t}: **not met**"),
        None => "for information".to_owned(),
    }
}

/// The wrk script: one fixed token, or a pool read from `tokens.txt`
/// round-robin.
fn write_script(dir: &Path, s: &Scenario) -> Result<PathBuf, String> {
    let signer = Signer::new(s.alg);
    let tokens = if s.tokens == 1 {
        vec![signer.token("load")]
    } else {
        signer.pool(s.tokens)
    };
    let list = dir.join(format!("{}-tokens.txt", s.name));
    std::fs::write(&list, tokens.join("\n") + "\n")
        .map_err(|e| format!("{}: {e}", list.display()))?;
    let script = dir.join(format!("{}.lua", s.name));
    let lua = format!(
        r#"-- Round-robin over the tokens in the list, one per request.
local tokens = {{}}
for line in io.lines("{}") do tokens[#tokens + 1] = line end
local i = 0
request = function()
  i = i % #tokens + 1
  return wrk.format("GET", "{}", {{ ["authorization"] = "Bearer " .. tokens[i] }})
end
"#,
        list.display(),
        ticket_path()
    );
    std::fs::write(&script, lua).map_err(|e| format!("{}: {e}", script.display()))?;
    Ok(script)
}

fn measure(
    exe: &Path,
    wrk: &Path,
    pin: bool,
    o: &Options,
    variant: &Variant,
    script: &Path,
    collector: Option<&Collector>,
) -> Result<Sample, String> {
    let before = collector.map(Collector::received).unwrap_or_default();
    let mut server = Server::start(
        exe,
        variant.spec,
        pin.then_some(o.server_cpu.as_str()),
        &variant.env(collector),
    )?;
    let token = Signer::new(variant.spec.alg).token("probe");
    let status = get(server.addr, &ticket_path(), Some(&token)).map(|(s, _)| s);
    if status != Ok(200) {
        return Err(format!(
            "{} answered {status:?} to a valid request instead of 200",
            variant.label
        ));
    }
    std::thread::sleep(Duration::from_secs(1));
    let idle = rss(server.child.id(), "VmRSS:");
    let wrk_cmd = |secs: u64| {
        let mut c = if pin {
            let mut c = Command::new("taskset");
            c.arg("-c").arg(&o.load_cpu).arg(wrk);
            c
        } else {
            Command::new(wrk)
        };
        c.args([
            "-t1".to_owned(),
            format!("-c{}", o.connections),
            format!("-d{secs}s"),
            "--latency".to_owned(),
            "-s".to_owned(),
            script.display().to_string(),
            format!("http://{}", server.addr),
        ]);
        c.stdin(Stdio::null()).stderr(Stdio::inherit());
        c
    };
    // The probe.
    let mut served = 1.0;
    if o.warmup > 0 {
        let out = wrk_cmd(o.warmup)
            .output()
            .map_err(|e| format!("wrk: {e}"))?;
        served += parse_wrk(&String::from_utf8_lossy(&out.stdout)).map_or(0.0, |s| s.requests);
    }
    let cpu_before = cpu_secs(server.child.id());
    let out = wrk_cmd(o.secs).output().map_err(|e| format!("wrk: {e}"))?;
    let cpu = cpu_secs(server.child.id()) - cpu_before;
    let peak = rss(server.child.id(), "VmHWM:");
    let (spans_exported, spans_dropped) = if variant.otel.is_some() {
        // The last partial batch leaves on the schedule (1 s by default);
        // wait for it, so that the counts cover every request served.
        std::thread::sleep(Duration::from_millis(1_500));
        otel_counts(server.addr)
    } else {
        (0.0, 0.0)
    };
    server.stop();
    let received = collector.map(Collector::received).unwrap_or_default() - before;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        return Err(format!("wrk failed: {text}"));
    }
    parse_wrk(&text).map(|s| Sample {
        cpu_us: cpu * 1e6 / s.requests,
        idle_rss_mib: idle,
        peak_rss_mib: peak,
        served: served + s.requests,
        received,
        spans_exported,
        spans_dropped,
        ..s
    })
}

/// The server's `otel_spans_exported_total` and `otel_spans_dropped_total`
/// (all reasons), from its `/metrics`; `NaN` when it cannot be read.
pub(crate) fn otel_counts(addr: SocketAddr) -> (f64, f64) {
    let Ok((200, text)) = get(addr, "/metrics", None) else {
        return (f64::NAN, f64::NAN);
    };
    let sum = |name: &str| {
        text.lines()
            .filter(|l| {
                l.strip_prefix(name)
                    .is_some_and(|rest| rest.starts_with(['{', ' ']))
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>()
    };
    (
        sum("otel_spans_exported_total"),
        sum("otel_spans_dropped_total"),
    )
}

/// Reads requests/s, p50, p99 and errors from `wrk --latency`.
fn parse_wrk(text: &str) -> Result<Sample, String> {
    let line = |prefix: &str| {
        text.lines()
            .map(str::trim)
            .find(|l| l.starts_with(prefix))
            .map(|l| l[prefix.len()..].trim())
    };
    let rps = line("Requests/sec:")
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| format!("no Requests/sec in wrk's output:\n{text}"))?;
    let latency = |p: &str| {
        line(p)
            .and_then(duration_us)
            .ok_or_else(|| format!("no {p} latency in wrk's output:\n{text}"))
    };
    let non_2xx = line("Non-2xx or 3xx responses:").map_or(0, |v| v.parse().unwrap_or(u64::MAX));
    let socket = line("Socket errors:").map_or(0, |v| {
        v.split(',')
            .filter_map(|part| part.split_whitespace().last()?.parse::<u64>().ok())
            .sum()
    });
    // "812345 requests in 10.00s, 133.25MB read"
    let requests = text
        .lines()
        .find(|l| l.contains(" requests in "))
        .and_then(|l| l.split_whitespace().next()?.parse().ok())
        .ok_or_else(|| format!("no request count in wrk's output:\n{text}"))?;
    Ok(Sample {
        rps,
        requests,
        p50_us: latency("50%")?,
        p99_us: latency("99%")?,
        errors: non_2xx + socket,
        ..Sample::default()
    })
}

fn duration_us(v: &str) -> Option<f64> {
    let split = v.find(|c: char| c.is_ascii_alphabetic())?;
    let (n, unit) = v.split_at(split);
    let n: f64 = n.parse().ok()?;
    Some(match unit {
        "us" => n,
        "ms" => n * 1e3,
        "s" => n * 1e6,
        "m" => n * 60e6,
        _ => return None,
    })
}

/// A variant's server process, killed on drop.
pub(crate) struct Server {
    child: Child,
    pub(crate) addr: SocketAddr,
}

impl Server {
    /// Starts `spec` on a free loopback port, with `env` added to its
    /// environment, and waits until it accepts.
    pub(crate) fn start(
        exe: &Path,
        spec: ServerSpec,
        cpu: Option<&str>,
        env: &[(&'static str, String)],
    ) -> Result<Self, String> {
        let addr = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|e| format!("no free port: {e}"))?;
        let mut cmd = match cpu {
            Some(cpu) => {
                let mut c = Command::new("taskset");
                c.arg("-c").arg(cpu).arg(exe);
                c
            }
            None => Command::new(exe),
        };
        server_env(&mut cmd, addr, env);
        let child = cmd
            .args(spec.args())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", exe.display()))?;
        let mut server = Server { child, addr };
        let deadline = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect(addr).is_err() {
            if let Ok(Some(status)) = server.child.try_wait() {
                return Err(format!("the {} server exited: {status}", spec.kind.arg()));
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "the {} server did not listen within 30 s",
                    spec.kind.arg()
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(server)
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A server's environment: its address, no `CHASSIS_LOG` and no inherited
/// `OTEL_*` (span export is on only where a variant asks), then `env`.
fn server_env(cmd: &mut Command, addr: SocketAddr, env: &[(&'static str, String)]) {
    cmd.env("CHASSIS_BIND", addr.to_string())
        .env_remove("CHASSIS_LOG");
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("OTEL_") {
            cmd.env_remove(name);
        }
    }
    cmd.envs(env.iter().map(|(k, v)| (k, v)));
}

/// One `GET` over a fresh connection: the status and the body.
pub(crate) fn get(
    addr: SocketAddr,
    path: &str,
    token: Option<&str>,
) -> Result<(u16, String), String> {
    let mut s = TcpStream::connect(addr).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    let auth = token.map_or(String::new(), |t| format!("authorization: Bearer {t}\r\n"));
    write!(
        s,
        "GET {path} HTTP/1.1\r\nhost: {addr}\r\n{auth}connection: close\r\n\r\n"
    )
    .map_err(|e| e.to_string())?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&raw);
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("not an HTTP answer: {text}"))?;
    let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    Ok((status, body.to_owned()))
}

/// User and system CPU seconds of `pid` so far, all threads.
fn cpu_secs(pid: u32) -> f64 {
    // Fields 14 and 15 of /proc/<pid>/stat, after the parenthesised name.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            let rest = &s[s.rfind(')')? + 2..];
            let f: Vec<&str> = rest.split_whitespace().collect();
            let ticks = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
            Some(ticks / clock_ticks())
        })
        .unwrap_or(f64::NAN)
}

/// `getconf CLK_TCK`: 100 on Linux unless told otherwise.
fn clock_ticks() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}

fn rss(pid: u32, field: &str) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))?
                .split_whitespace()
                .nth(1)?
                .parse::<f64>()
                .ok()
        })
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

fn has(program: &str) -> bool {
    which(program).is_some()
}

fn which(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join(program))
            .find(|p| p.is_file())
    })
}

/// `wrk`, installed from the distribution's packages when missing.
fn find_or_install_wrk() -> Result<PathBuf, String> {
    find_or_install("wrk", "wrk")
}

/// `program`, installed from the distribution's `package` when missing.
fn find_or_install(program: &str, package: &str) -> Result<PathBuf, String> {
    if let Some(p) = which(program) {
        return Ok(p);
    }
    println!("{program} is not installed; installing {package} with apt-get");
    let ok = Command::new("apt-get")
        .args(["install", "-y", "-q", package])
        .status()
        .is_ok_and(|s| s.success());
    match which(program) {
        Some(p) if ok => Ok(p),
        _ => Err(format!(
            "{program} is needed: install it (`apt-get install {package}`) and run again"
        )),
    }
}

/// `--instructions`: user-space instructions per request of the variants of
/// the first scenario listed (`cached` unless told: A, B and C), counted by
/// callgrind over a fixed window of load (all threads of the server, its
/// log, audit and span-export threads included), with the scenario's
/// tokens. Unlike requests/s this count hardly moves between runs on a busy
/// machine, so it shows what a change to the request path saves. Nothing
/// is pinned; the collector runs when a variant exports spans.
pub(crate) fn instructions(exe: &Path, o: &Options) -> Result<(), String> {
    let wrk = find_or_install_wrk()?;
    let valgrind = find_or_install("valgrind", "valgrind")?;
    let control =
        which("callgrind_control").ok_or("callgrind_control (part of valgrind) is missing")?;
    let name = o.scenarios.first().map_or("cached", String::as_str);
    let scenario = scenario(name).expect("validated");
    println!(
        "== instructions per request, scenario `{}`: {}",
        scenario.name, scenario.title
    );
    let dir = std::env::temp_dir().join(format!("chassis-load-cg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let script = write_script(&dir, &scenario)?;
    let collector = if scenario.exports() {
        let c = Collector::start(None)?;
        println!("collector at {} ({})", c.endpoint(), c.placement);
        Some(c)
    } else {
        None
    };
    let token = Signer::new(scenario.alg).token("probe");
    let load = |addr: SocketAddr, secs: u64| -> Result<f64, String> {
        let out = Command::new(&wrk)
            .args(["-t1", "-c8", "--latency", &format!("-d{secs}s"), "-s"])
            .arg(&script)
            .arg(format!("http://{addr}"))
            .output()
            .map_err(|e| format!("wrk: {e}"))?;
        parse_wrk(&String::from_utf8_lossy(&out.stdout)).map(|s| s.requests)
    };
    let mut rows = Vec::new();
    for (i, variant) in scenario.variants.iter().enumerate() {
        let addr = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|e| format!("no free port: {e}"))?;
        // Unique per variant, and no variant's name a prefix of another's.
        let prefix = format!("cg-{i}-{}", variant.label);
        let out = dir.join(&prefix);
        let before = collector
            .as_ref()
            .map(Collector::received)
            .unwrap_or_default();
        let mut cmd = Command::new(&valgrind);
        cmd.args(["--tool=callgrind", "--instr-atstart=no"])
            .arg(format!("--callgrind-out-file={}", out.display()))
            .arg(exe)
            .args(variant.spec.args());
        server_env(&mut cmd, addr, &variant.env(collector.as_ref()));
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("valgrind: {e}"))?;
        let pid = child.id().to_string();
        let result = (|| {
            let deadline = Instant::now() + Duration::from_secs(120);
            while get(addr, &ticket_path(), Some(&token)).map(|(s, _)| s) != Ok(200) {
                if Instant::now() > deadline {
                    return Err(format!("{} did not answer under valgrind", variant.label));
                }
                std::thread::sleep(Duration::from_millis(200));
            }
            let warm = load(addr, o.warmup.max(1))?;
            let ctl = |args: &[&str]| {
                Command::new(&control)
                    .args(args)
                    .arg(&pid)
                    .stdout(Stdio::null())
                    .status()
                    .map_err(|e| format!("callgrind_control: {e}"))
            };
            ctl(&["-i", "on"])?;
            let requests = load(addr, o.secs)?;
            ctl(&["-i", "off"])?;
            ctl(&["-d"])?;
            // The dump is written asynchronously; wait for its totals.
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                if let Some(total) = callgrind_total(&dir, &prefix) {
                    return Ok((warm, requests, total));
                }
                if Instant::now() > deadline {
                    return Err("no callgrind dump".to_owned());
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        })();
        if variant.otel.is_some() && result.is_ok() {
            // The last partial batch leaves on the schedule (1 s by default).
            // (The server's `/metrics` is not read: reading the process's
            // figures crashes it under valgrind.)
            std::thread::sleep(Duration::from_millis(1_500));
        }
        let _ = child.kill();
        let _ = child.wait();
        let (warm, requests, total) = result?;
        let received = collector
            .as_ref()
            .map(Collector::received)
            .unwrap_or_default()
            - before;
        let per = total / requests;
        println!(
            "{:<10} {:>8.0} instructions per request ({requests:.0} requests counted)",
            variant.label, per
        );
        rows.push(Row {
            label: variant.label,
            per,
            received,
            // The probe that answered, the warm-up and the window.
            served: 1.0 + warm + requests,
        });
    }
    let _ = std::fs::remove_dir_all(&dir);
    let (first, base) = rows.first().map_or(("?", f64::NAN), |r| (r.label, r.per));
    println!("\n| variant | instructions per request | over {first} |\n|---|---|---|");
    for r in &rows {
        println!("| {} | {:.0} | {:+.0} |", r.label, r.per, r.per - base);
    }
    let per = |label: &str| {
        rows.iter()
            .find(|r| r.label == label)
            .map(|r| r.per)
            .expect("a ratio names variants of its scenario")
    };
    println!();
    for (n, d, target) in &scenario.ratios {
        let (pn, pd) = (per(n), per(d));
        println!(
            "- {n}/{d} by instructions ({d}'s over {n}'s): {:.2}; {}. {n} − {d}: {:+.0} instructions per request",
            pd / pn,
            verdict(pd / pn, *target),
            pn - pd,
        );
    }
    if let Some(c) = &collector {
        println!(
            "\nWhat the collector ({}) received from each server, start to stop:",
            c.placement
        );
        for r in &rows {
            println!(
                "- {}: {} export requests, {} bytes, {:.0} bytes per request served ({:.0} served)",
                r.label,
                r.received.requests,
                r.received.bytes,
                r.received.bytes as f64 / r.served,
                r.served
            );
        }
    }
    Ok(())
}

/// One variant's count under `--instructions`.
struct Row {
    label: &'static str,
    /// Instructions per request in the window.
    per: f64,
    /// What the collector received from the server, start to stop.
    received: Received,
    /// Requests it answered in all (wrk's counts).
    served: f64,
}

/// The largest `totals:` (or `summary:`) count in the dumps named
/// `prefix*` in `dir`; `None` until one is written.
fn callgrind_total(dir: &Path, prefix: &str) -> Option<f64> {
    std::fs::read_dir(dir)
        .ok()?
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().starts_with(prefix))
        .filter_map(|e| std::fs::read_to_string(e.path()).ok())
        .flat_map(|text| {
            text.lines()
                .filter_map(|l| {
                    l.strip_prefix("totals:")
                        .or_else(|| l.strip_prefix("summary:"))
                })
                .filter_map(|v| v.split_whitespace().next()?.parse::<f64>().ok())
                .collect::<Vec<_>>()
        })
        .filter(|t| *t > 0.0)
        .reduce(f64::max)
}

fn wrk_version(wrk: &Path) -> String {
    Command::new(wrk)
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| {
            let text = String::from_utf8_lossy(&o.stdout).into_owned()
                + &String::from_utf8_lossy(&o.stderr);
            text.lines()
                .next()
                .map(|l| l.split(" Copyright").next().unwrap_or(l).trim().to_owned())
        })
        .unwrap_or_else(|| "wrk".to_owned())
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, m)| m.trim().to_owned())
        })
        .unwrap_or_else(|| "an unknown CPU".to_owned())
}

fn mem_gib() -> String {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            let kb: f64 = s.lines().next()?.split_whitespace().nth(1)?.parse().ok()?;
            Some(format!("{:.0}", kb / 1024.0 / 1024.0))
        })
        .unwrap_or_else(|| "?".to_owned())
}

fn kernel() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "?".to_owned())
}

fn today() -> String {
    Command::new("date")
        .arg("+%Y-%m-%d")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "today".to_owned())
}

const BEGIN: &str = "<!-- load:begin -->";
const END: &str = "<!-- load:end -->";

/// Replaces the text between the markers in `doc` (or appends a section).
fn write_section(doc: &Path, body: &str) -> Result<(), String> {
    let text = std::fs::read_to_string(doc).map_err(|e| format!("{}: {e}", doc.display()))?;
    let block = format!("{BEGIN}\n{body}{END}");
    let new = match (text.find(BEGIN), text.find(END)) {
        (Some(b), Some(e)) if b < e => format!("{}{block}{}", &text[..b], &text[e + END.len()..]),
        _ => format!(
            "{text}\n## Load: the chassis against bare axum and a hand-assembled stack\n\n{block}\n"
        ),
    };
    std::fs::write(doc, new).map_err(|e| format!("{}: {e}", doc.display()))
}
