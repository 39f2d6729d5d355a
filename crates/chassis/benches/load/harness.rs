//! Runs the scenarios: each variant in its own process pinned to one core,
//! `wrk` pinned to the other, over loopback, variants interleaved per round.

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
                        return Err(format!("unknown scenario `{s}` (cached, distinct, routes)"));
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
}

/// What a scenario compares, and how its verdict is read.
struct Scenario {
    name: &'static str,
    title: &'static str,
    /// Tokens: one (`1`) or a pool drawn round-robin.
    tokens: usize,
    alg: Algorithm,
    variants: Vec<Variant>,
    /// Ratios to print per round: (numerator, denominator, target, what).
    ratios: Vec<(&'static str, &'static str, f64)>,
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
            ratios: vec![("C", "A", 0.75), ("C", "B", 3.0)],
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
            ratios: vec![("C", "B-EdDSA", 0.9)],
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
            ratios: vec![("C-1000", "C-10", 0.95), ("C-1000", "A-1000", 0.75)],
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
        let mut rounds: Vec<Vec<Sample>> = Vec::new();
        for round in 1..=o.rounds {
            let mut samples = Vec::new();
            for variant in &s.variants {
                let sample = measure(exe, &wrk, pin, o, variant, &script)?;
                println!(
                    "round {round} {:<8} {:>9.0} req/s  CPU {:>5.1} µs/req  p50 {:>7.0} µs  p99 {:>7.0} µs  errors {}  RSS idle {:.1} MiB, peak {:.1} MiB",
                    variant.label,
                    sample.rps,
                    sample.cpu_us,
                    sample.p50_us,
                    sample.p99_us,
                    sample.errors,
                    sample.idle_rss_mib,
                    sample.peak_rss_mib
                );
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
        report.push_str(&table(&s, &rounds));
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

fn table(s: &Scenario, rounds: &[Vec<Sample>]) -> String {
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
            "- {n}/{d} in requests/s: {} per round, median {m:.2}; target ≥ {target}: **{}**. Server CPU per request, {n} − {d}: {:.1} µs (median of rounds)",
            per.iter()
                .map(|x| format!("{x:.2}"))
                .collect::<Vec<_>>()
                .join(", "),
            if m >= *target { "met" } else { "not met" },
            median(rounds.iter().map(|r| cpu(s, r, n) - cpu(s, r, d)).collect()),
        );
        // What the ratio of rates would be with each server's one core
        // saturated: steadier than the rates when the load generator's
        // core is disturbed too.
        let by_cpu = median(rounds.iter().map(|r| cpu(s, r, d) / cpu(s, r, n)).collect());
        let _ = writeln!(
            t,
            "  - the same from server CPU per request ({d}'s over {n}'s): {by_cpu:.2}; target ≥ {target}: **{}**",
            if by_cpu >= *target { "met" } else { "not met" },
        );
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
) -> Result<Sample, String> {
    let mut server = Server::start(exe, variant.spec, pin.then_some(o.server_cpu.as_str()))?;
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
    if o.warmup > 0 {
        wrk_cmd(o.warmup)
            .output()
            .map_err(|e| format!("wrk: {e}"))?;
    }
    let cpu_before = cpu_secs(server.child.id());
    let out = wrk_cmd(o.secs).output().map_err(|e| format!("wrk: {e}"))?;
    let cpu = cpu_secs(server.child.id()) - cpu_before;
    let peak = rss(server.child.id(), "VmHWM:");
    server.stop();
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        return Err(format!("wrk failed: {text}"));
    }
    parse_wrk(&text).map(|s| Sample {
        cpu_us: cpu * 1e6 / s.requests,
        idle_rss_mib: idle,
        peak_rss_mib: peak,
        ..s
    })
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
    /// Starts `spec` on a free loopback port and waits until it accepts.
    pub(crate) fn start(exe: &Path, spec: ServerSpec, cpu: Option<&str>) -> Result<Self, String> {
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
        let child = cmd
            .args(spec.args())
            .env("CHASSIS_BIND", addr.to_string())
            .env_remove("CHASSIS_LOG")
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

/// `--instructions`: user-space instructions per request of A, B and C,
/// counted by callgrind over a fixed window of load (all threads of the
/// server, its log and audit writers included). Unlike requests/s this
/// count hardly moves between runs on a busy machine, so it shows what a
/// change to the request path saves.
pub(crate) fn instructions(exe: &Path, o: &Options) -> Result<(), String> {
    let wrk = find_or_install_wrk()?;
    let valgrind = find_or_install("valgrind", "valgrind")?;
    let control =
        which("callgrind_control").ok_or("callgrind_control (part of valgrind) is missing")?;
    let dir = std::env::temp_dir().join(format!("chassis-load-cg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let token = Signer::new(Algorithm::RS256).token("load");
    let url = |addr: SocketAddr| format!("http://{addr}{}", ticket_path());
    let load = |addr: SocketAddr, secs: u64| -> Result<f64, String> {
        let out = Command::new(&wrk)
            .args(["-t1", "-c8", "--latency", &format!("-d{secs}s"), "-H"])
            .arg(format!("authorization: Bearer {token}"))
            .arg(url(addr))
            .output()
            .map_err(|e| format!("wrk: {e}"))?;
        parse_wrk(&String::from_utf8_lossy(&out.stdout)).map(|s| s.requests)
    };
    let mut rows = Vec::new();
    let scenario = scenario("cached").expect("known");
    for variant in &scenario.variants {
        let addr = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|e| format!("no free port: {e}"))?;
        let out = dir.join(format!("cg-{}", variant.label));
        let mut child = Command::new(&valgrind)
            .args(["--tool=callgrind", "--instr-atstart=no"])
            .arg(format!("--callgrind-out-file={}", out.display()))
            .arg(exe)
            .args(variant.spec.args())
            .env("CHASSIS_BIND", addr.to_string())
            .env_remove("CHASSIS_LOG")
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
            load(addr, o.warmup.max(1))?;
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
                if let Some(total) = callgrind_total(&dir, &format!("cg-{}", variant.label)) {
                    return Ok((requests, total));
                }
                if Instant::now() > deadline {
                    return Err("no callgrind dump".to_owned());
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        })();
        let _ = child.kill();
        let _ = child.wait();
        let (requests, total) = result?;
        let per = total / requests;
        println!(
            "{:<3} {:>8.0} instructions per request ({requests:.0} requests counted)",
            variant.label, per
        );
        rows.push((variant.label, per));
    }
    let _ = std::fs::remove_dir_all(&dir);
    let base = rows.first().map_or(f64::NAN, |r| r.1);
    println!("\n| variant | instructions per request | over A |\n|---|---|---|");
    for (label, per) in &rows {
        println!("| {label} | {per:.0} | {:+.0} |", per - base);
    }
    Ok(())
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
