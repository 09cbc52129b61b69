//! IP allowlist cost: the time to apply a 10,000-entry allowlist on a node
//! (`CORRAL_BENCH_ENTRIES` changes the size), end to end (`corralctl
//! cluster allowlist set --file` until every node holds it) and as the agent
//! reports its one nftables transaction; then the latency of new
//! connections to the engine (TCP, PostgreSQL login, `SELECT 1`) with that
//! list in place and with no list; and the agent's CPU (its `nft` runs
//! included: the drift check lists the table every 5 s) and memory with
//! and without the list. Prints figures; asserts nothing about speed. Run
//! with `make bench` (release binaries).

use corral_tests::procstat::{clock_ticks, cpu_ticks_with_children, status_kib};
use corral_tests::{env_num, wait_until, Lab};
use std::time::{Duration, Instant};

/// The agent's CPU (% of one core, children included) and RSS (MiB) over
/// `window`.
fn agent_footprint(pid: i32, window: Duration) -> (f64, f64) {
    let hz = clock_ticks();
    let began = Instant::now();
    let c0 = cpu_ticks_with_children(pid);
    std::thread::sleep(window);
    let cpu = (cpu_ticks_with_children(pid) - c0) as f64 / hz;
    let rss = status_kib(pid, "VmRSS:") as f64 / 1024.0;
    (100.0 * cpu / began.elapsed().as_secs_f64(), rss)
}

/// Latencies (ms) of `n` fresh connections + `SELECT 1` to `uri`.
fn connect_latencies(uri: &str, n: usize) -> Vec<f64> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            let began = Instant::now();
            let (client, conn) = tokio_postgres::connect(uri, tokio_postgres::NoTls)
                .await
                .expect("connecting to the engine");
            let task = tokio::spawn(conn);
            client.simple_query("SELECT 1").await.expect("SELECT 1");
            out.push(began.elapsed().as_secs_f64() * 1000.0);
            drop(client);
            let _ = task.await;
        }
        out
    })
}

/// Latencies (ms) of `n` bare TCP connects (handshake only) to `addr`.
fn tcp_latencies(addr: &str, n: usize) -> Vec<f64> {
    let addr: std::net::SocketAddr = addr.parse().expect("host:port");
    (0..n)
        .map(|_| {
            let began = Instant::now();
            let s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2))
                .expect("TCP connect to the engine");
            let ms = began.elapsed().as_secs_f64() * 1000.0;
            drop(s);
            ms
        })
        .collect()
}

fn stats(mut v: Vec<f64>) -> String {
    v.sort_by(|a, b| a.total_cmp(b));
    let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
    format!(
        "min {:.2} ms  median {:.2} ms  p99 {:.2} ms  max {:.2} ms",
        v[0],
        at(0.5),
        at(0.99),
        v[v.len() - 1]
    )
}

fn main() {
    let entries = env_num("CORRAL_BENCH_ENTRIES", 10_000) as usize;
    let conns = env_num("CORRAL_BENCH_CONNECTIONS", 300) as usize;
    let window = Duration::from_secs(env_num("CORRAL_BENCH_SECONDS", 30));
    let lab = Lab::start(1).unwrap();
    let creds = lab.create_replicated("bench", "vm1", &[]).unwrap();
    let uri = lab.node_uri(&creds, 1);
    let agent = *lab
        .pids_in_vm(1, "corral-agent")
        .first()
        .expect("agent pid");
    let tcp_addr = format!("{}:5432", lab.vm_ip(1));
    connect_latencies(&uri, 20); // warm up
    let open = connect_latencies(&uri, conns);
    let open_tcp = tcp_latencies(&tcp_addr, 10 * conns);
    let (open_cpu, open_rss) = agent_footprint(agent, window);

    // The list: this host and the CLI's namespace, and addresses from the
    // benchmarking range 198.18.0.0/15, every other one so that none merge.
    let mut list = vec![lab.ip4_of("host").unwrap(), lab.ip4_of("cli").unwrap()];
    let mut i: u32 = 0;
    while list.len() < entries {
        let a = (198u32 << 24) | (18 << 16) | (i * 2);
        list.push(std::net::Ipv4Addr::from(a).to_string());
        i += 1;
    }
    let file = lab.dir().join("allowlist.txt");
    std::fs::write(&file, list.join("\n")).unwrap();
    let began = Instant::now();
    lab.ctl_ok(&[
        "cluster",
        "allowlist",
        "set",
        "bench",
        "--file",
        &file.to_string_lossy(),
    ])
    .unwrap();
    let end_to_end = began.elapsed();
    // The agent's own account of its nftables transaction.
    let mut applied = String::new();
    wait_until(
        Duration::from_secs(10),
        "the allowlist_applied event",
        || {
            let ev = lab.ctl_json(&["event", "list", "--node", "vm1"])?;
            applied = ev["events"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|e| e["kind"] == "allowlist_applied")
                .filter_map(|e| e["message"].as_str().map(str::to_string))
                .next_back()
                .unwrap_or_default();
            Ok(!applied.is_empty())
        },
    )
    .unwrap();
    let listed = lab
        .in_ns(
            "vm1",
            "nft",
            &["-j", "list", "set", "inet", "corral", "allow4"],
        )
        .ok()
        .and_then(|o| serde_json::from_slice::<serde_json::Value>(&o.stdout).ok())
        .and_then(|doc| {
            let set = doc["nftables"]
                .as_array()?
                .iter()
                .find_map(|o| o.get("set"))?;
            Some(set["elem"].as_array().map_or(0, Vec::len))
        })
        .unwrap_or(0);
    let filtered = connect_latencies(&uri, conns);
    let filtered_tcp = tcp_latencies(&tcp_addr, 10 * conns);
    let (list_cpu, list_rss) = agent_footprint(agent, window);

    println!(
        "allowlist of {entries} entries on one node ({listed} elements in set allow4):\n  \
         corralctl set -> every node applied: {:.0} ms (end to end, incl. the next heartbeat)\n  \
         agent: {applied}",
        end_to_end.as_secs_f64() * 1000.0
    );
    println!("new connections + login + SELECT 1 ({conns} each):");
    println!("  no allowlist       {}", stats(open));
    println!("  {entries:>6}-entry list  {}", stats(filtered));
    println!("bare TCP handshakes ({} each):", 10 * conns);
    println!("  no allowlist       {}", stats(open_tcp));
    println!("  {entries:>6}-entry list  {}", stats(filtered_tcp));
    println!(
        "agent over {} s (heartbeat 500 ms, drift check every 5 s, nft runs included):",
        window.as_secs()
    );
    println!("  no allowlist       CPU {open_cpu:.2}% of one core, RSS {open_rss:.1} MiB");
    println!("  {entries:>6}-entry list  CPU {list_cpu:.2}% of one core, RSS {list_rss:.1} MiB");
}
