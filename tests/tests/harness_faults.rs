//! The failover harness itself, before any failover exists: network cuts and
//! isolation do what they say and are undone exactly; HAProxy runs in the
//! client namespace and follows health endpoints within a second, ending the
//! sessions of a server it marks down; the split-brain checker flags two
//! writable nodes and accepts a clean hand-over; the small lab helpers and
//! stress-ng work.
//!
//! Where the agents' health endpoints are needed, a stand-in serves them (a
//! few lines of Perl, always on Debian), and plain PostgreSQL servers stand
//! in for the engines, so these tests show the harness alone.

use corral_tests::checker::WriteChecker;
use corral_tests::stress::Stress;
use corral_tests::{wait_until, Lab};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Whether a TCP connection from namespace `from` to `ip:port` opens
/// within a second.
fn tcp_from(lab: &Lab, from: &str, ip: &str, port: u16) -> bool {
    lab.in_ns(
        from,
        "timeout",
        &["1", "bash", "-c", &format!("exec 3<>/dev/tcp/{ip}/{port}")],
    )
    .unwrap()
    .status
    .success()
}

/// Whether the test process (the host) connects to `ip:port` within a second.
fn tcp_from_host(ip: &str, port: u16) -> bool {
    let addr: SocketAddr = format!("{ip}:{port}").parse().unwrap();
    TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_ok()
}

fn ping_from(lab: &Lab, from: &str, ip: &str) -> bool {
    let v6 = if ip.contains(':') { "-6" } else { "-4" };
    lab.in_ns(from, "ping", &[v6, "-c", "1", "-W", "1", ip])
        .unwrap()
        .status
        .success()
}

#[test]
fn cuts_and_isolation_are_exact_and_undone() {
    let lab = Lab::start(2).unwrap();
    let (vm1, vm2) = (lab.vm_ip(1), lab.vm_ip(2));
    let (vm1_6, vm2_6) = (lab.ip6_of("vm1").unwrap(), lab.ip6_of("vm2").unwrap());
    let cli = lab.ip4_of("cli").unwrap();
    for ip in [&vm1, &vm2] {
        assert!(tcp_from(&lab, "cli", ip, 7401), "cli reaches {ip}:7401");
    }

    // A cut between cli and vm1: both directions, IPv4 and IPv6; vm2 and
    // the host are unaffected.
    lab.cut("cli", "vm1").unwrap();
    assert!(
        !tcp_from(&lab, "cli", &vm1, 7401),
        "cut: cli still reaches vm1"
    );
    assert!(!ping_from(&lab, "cli", &vm1_6), "cut: IPv6 still passes");
    assert!(!ping_from(&lab, "vm1", &cli), "cut: vm1 still reaches cli");
    assert!(tcp_from(&lab, "cli", &vm2, 7401), "cut: cli lost vm2 too");
    assert!(
        ping_from(&lab, "cli", &vm2_6),
        "cut: cli lost vm2 over IPv6"
    );
    assert!(tcp_from_host(&vm1, 7401), "cut: the host lost vm1");
    // Cutting again adds nothing: one heal undoes it.
    lab.cut("cli", "vm1").unwrap();
    let table = lab
        .in_ns("cli", "nft", &["list", "table", "inet", "crltest"])
        .unwrap();
    let table = String::from_utf8_lossy(&table.stdout).into_owned();
    assert_eq!(table.matches("drop").count(), 4, "{table}");

    // A second cut from the same namespace; healing one leaves the other.
    lab.cut("cli", "vm2").unwrap();
    assert!(!tcp_from(&lab, "cli", &vm2, 7401));
    lab.heal("cli", "vm1").unwrap();
    assert!(
        tcp_from(&lab, "cli", &vm1, 7401),
        "heal: cli still cut from vm1"
    );
    assert!(ping_from(&lab, "cli", &vm1_6), "heal: IPv6 still cut");
    assert!(ping_from(&lab, "vm1", &cli), "heal: vm1 still cut from cli");
    assert!(!tcp_from(&lab, "cli", &vm2, 7401), "heal(vm1) healed vm2");
    lab.heal("cli", "vm2").unwrap();
    assert!(tcp_from(&lab, "cli", &vm2, 7401));
    // Healing what is not cut, or cutting nonsense.
    lab.heal("cli", "vm2").unwrap();
    lab.heal("ctl", "vm1").unwrap();
    assert!(lab.cut("cli", "vm9").is_err());
    assert!(lab.cut("vm1", "vm1").is_err());

    // A cut between the coordinator and a VM is a partition the
    // coordinator notices (heartbeats stop), and heals.
    lab.cut("vm1", "ctl").unwrap();
    lab.wait_node_state("vm1", "down", Duration::from_secs(10))
        .unwrap();
    lab.heal("vm1", "ctl").unwrap();
    lab.wait_node_state("vm1", "up", Duration::from_secs(30))
        .unwrap();

    // Isolation: nobody reaches vm1, not even the host; vm2 is fine.
    lab.isolate(1).unwrap();
    assert!(!tcp_from_host(&vm1, 7401), "isolated: the host reaches vm1");
    assert!(
        !tcp_from(&lab, "cli", &vm1, 7401),
        "isolated: cli reaches vm1"
    );
    assert!(!ping_from(&lab, "vm1", &vm2), "isolated: vm1 reaches vm2");
    assert!(tcp_from_host(&vm2, 7401), "isolating vm1 cut vm2");
    lab.wait_node_state("vm1", "down", Duration::from_secs(10))
        .unwrap();
    lab.reconnect(1).unwrap();
    wait_until(Duration::from_secs(5), "vm1 to be reachable again", || {
        Ok(tcp_from_host(&vm1, 7401))
    })
    .unwrap();
    assert!(tcp_from(&lab, "cli", &vm1, 7401));
    assert!(ping_from(&lab, "cli", &vm1_6), "reconnected: IPv6");
    lab.wait_node_state("vm1", "up", Duration::from_secs(30))
        .unwrap();
    assert!(lab.isolate(3).is_err());
}

#[test]
fn haproxy_runs_in_the_client_namespace() {
    let mut lab = Lab::start(2).unwrap();
    let addr = lab.start_haproxy(&[1, 2]).unwrap();
    assert_eq!(addr, format!("10.231.{}.100:5000", lab.k));
    let ss = lab.in_ns("cli", "ss", &["-Hltn"]).unwrap();
    let ss = String::from_utf8_lossy(&ss.stdout).into_owned();
    assert!(ss.contains(&addr), "{ss}");
    assert!(ss.contains(&format!("10.231.{}.100:5001", lab.k)), "{ss}");
    let pids = corral_tests::sh("ip", &["netns", "pids", &lab.ns("cli")]).unwrap();
    assert!(
        pids.split_whitespace().any(|p| {
            std::fs::read_to_string(format!("/proc/{p}/comm")).is_ok_and(|c| c.trim() == "haproxy")
        }),
        "no haproxy process in the cli namespace"
    );
    // No cluster: no node is a primary or a replica, so every server is
    // down, whether the agents serve health endpoints or not.
    wait_until(Duration::from_secs(5), "every server down", || {
        let servers = lab.haproxy_servers()?;
        Ok(servers.len() == 4 && servers.iter().all(|s| s.status == "DOWN"))
    })
    .unwrap();
    // Starting again replaces it.
    lab.start_haproxy(&[1]).unwrap();
    assert_eq!(lab.haproxy_servers().unwrap().len(), 2);
    let log = std::fs::read_to_string(lab.dir().join("haproxy.log")).unwrap();
    assert!(log.contains("is DOWN"), "haproxy.log:\n{log}");
}

/// A plain PostgreSQL server in VM `i`, trusting the lab's subnet, as a
/// stand-in for an engine the agent runs. Killed with the lab.
fn start_postgres(lab: &Lab, i: usize) -> Child {
    let dir = lab.dir().join(format!("pg{i}"));
    let data = dir.join("data");
    std::fs::create_dir_all(&dir).unwrap();
    corral_tests::sh("chown", &["postgres:postgres", &dir.to_string_lossy()]).unwrap();
    let bin = Path::new("/usr/lib/postgresql/15/bin");
    corral_tests::sh(
        "runuser",
        &[
            "-u",
            "postgres",
            "--",
            &bin.join("initdb").to_string_lossy(),
            "-D",
            &data.to_string_lossy(),
            "-A",
            "trust",
            "-U",
            "postgres",
            "--no-sync",
        ],
    )
    .unwrap();
    let hba = data.join("pg_hba.conf");
    let mut rules = std::fs::read_to_string(&hba).unwrap();
    rules.push_str(&format!("host all all 10.231.{}.0/24 trust\n", lab.k));
    std::fs::write(&hba, rules).unwrap();
    let log = std::fs::File::create(lab.dir().join(format!("pg{i}.log"))).unwrap();
    let child = Command::new("ip")
        .args(["netns", "exec", &lab.ns(&format!("vm{i}"))])
        .args(["runuser", "-u", "postgres", "--"])
        .arg(bin.join("postgres"))
        .arg("-D")
        .arg(&data)
        .args(["-c", &format!("listen_addresses={}", lab.vm_ip(i))])
        .args(["-c", &format!("unix_socket_directories={}", dir.display())])
        .args(["-c", "fsync=off"])
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    let uri = plain_uri(lab, i);
    wait_until(
        Duration::from_secs(20),
        &format!("postgres on vm{i}"),
        || Ok(lab.psql(&uri, "SELECT 1").is_ok()),
    )
    .unwrap();
    child
}

fn plain_uri(lab: &Lab, i: usize) -> String {
    format!("postgresql://postgres@{}:5432/postgres", lab.vm_ip(i))
}

/// A stand-in for an agent's health endpoints in VM `i`: `GET /<name>`
/// answers 200 while the file `<dir>/<name>` exists, else 503.
fn start_fake_health(lab: &Lab, i: usize) -> (Child, PathBuf) {
    let dir = lab.dir().join(format!("health{i}"));
    std::fs::create_dir_all(&dir).unwrap();
    const SERVER: &str = r#"
        use IO::Socket::INET;
        my ($addr, $dir) = @ARGV;
        my $s = IO::Socket::INET->new(LocalAddr => $addr, Listen => 64, ReuseAddr => 1)
            or die "listen on $addr: $!";
        while (my $c = $s->accept) {
            my $request = <$c> // '';
            # Read the whole request before answering, so closing does not
            # reset the connection under the answer.
            while (my $line = <$c>) { last if $line =~ /^\r?\n$/ }
            my ($name) = $request =~ m{^GET /(\w+)};
            my $status = defined $name && -e "$dir/$name" ? "200 OK" : "503 Service Unavailable";
            print $c "HTTP/1.0 $status\r\nContent-Length: 0\r\n\r\n";
            close $c;
        }
    "#;
    let log = std::fs::File::create(lab.dir().join(format!("health{i}.log"))).unwrap();
    let child = Command::new("ip")
        .args(["netns", "exec", &lab.ns(&format!("vm{i}"))])
        .args(["perl", "-e", SERVER])
        .arg(format!("{}:7402", lab.vm_ip(i)))
        .arg(&dir)
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    wait_until(Duration::from_secs(5), "the health stand-in", || {
        Ok(lab.health(i, "/health").is_ok())
    })
    .unwrap();
    (child, dir)
}

/// Marks VM health directory `dir` as answering 200 on exactly `paths`.
fn set_health(dir: &Path, paths: &[&str]) {
    for p in ["primary", "replica", "health"] {
        let f = dir.join(p);
        if paths.contains(&p) {
            std::fs::write(&f, "").unwrap();
        } else {
            let _ = std::fs::remove_file(&f);
        }
    }
}

/// The status of `proxy`/`server` in HAProxy, or "?" when it cannot say.
fn status(lab: &Lab, proxy: &str, server: &str) -> String {
    lab.haproxy_server_status(proxy, server)
        .unwrap_or_else(|_| "?".into())
}

#[test]
fn haproxy_follows_health_endpoints_and_ends_sessions_of_a_demoted_primary() {
    let mut lab = Lab::unenrolled(2).unwrap();
    let _pg = [start_postgres(&lab, 1), start_postgres(&lab, 2)];
    let (_h1, dir1) = start_fake_health(&lab, 1);
    let (_h2, dir2) = start_fake_health(&lab, 2);
    set_health(&dir1, &["primary", "health"]);
    set_health(&dir2, &["replica", "health"]);
    assert_eq!(lab.health(1, "/primary").unwrap(), 200);
    assert_eq!(lab.health(1, "replica").unwrap(), 503);
    assert_eq!(lab.health(2, "/replica").unwrap(), 200);

    lab.start_haproxy(&[1, 2]).unwrap();
    wait_until(Duration::from_secs(5), "haproxy to see vm1 primary", || {
        Ok(status(&lab, "primary", "vm1") == "UP"
            && status(&lab, "primary", "vm2") == "DOWN"
            && status(&lab, "replicas", "vm2") == "UP"
            && status(&lab, "replicas", "vm1") == "DOWN")
    })
    .unwrap();
    let creds = serde_json::json!({"user": "postgres", "password": "", "database": "postgres"});
    let primary = lab.haproxy_uri(&creds);
    let replicas = lab.haproxy_replicas_uri(&creds);
    assert_eq!(
        primary,
        format!("postgresql://postgres:@10.231.{}.100:5000/postgres", lab.k)
    );
    let server = |uri: &str| lab.psql(uri, "SELECT host(inet_server_addr())");
    assert_eq!(server(&primary).unwrap(), lab.vm_ip(1));
    assert_eq!(server(&replicas).unwrap(), lab.vm_ip(2));

    // A session through the primary port, as an application holds one.
    let mut session = Command::new("ip")
        .args(["netns", "exec", &lab.ns("cli")])
        .args(["psql", "-X", "-c", "SELECT pg_sleep(60)", &primary])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        session.try_wait().unwrap().is_none(),
        "the session ended early"
    );

    // vm1 stops being primary and vm2 becomes it, as in a failover.
    let flipped = Instant::now();
    set_health(&dir1, &["health"]);
    set_health(&dir2, &["primary", "health"]);
    wait_until(Duration::from_secs(3), "haproxy to see vm2 primary", || {
        Ok(status(&lab, "primary", "vm1") == "DOWN" && status(&lab, "primary", "vm2") == "UP")
    })
    .unwrap();
    let seen = flipped.elapsed();
    // Down after 2 failed checks 200 ms apart, up after 1 success.
    assert!(seen < Duration::from_millis(1500), "took {seen:?}");
    eprintln!("haproxy saw the new primary after {seen:?}");
    // The demoted primary's session was ended, not left attached.
    wait_until(Duration::from_secs(2), "the old session to end", || {
        Ok(session.try_wait()?.is_some())
    })
    .unwrap();
    let out = session.wait_with_output().unwrap();
    assert!(
        !out.status.success(),
        "the session on the old primary went on"
    );
    assert_eq!(server(&primary).unwrap(), lab.vm_ip(2));
}

#[test]
fn the_checker_flags_two_writable_nodes_and_accepts_a_hand_over() {
    let lab = Lab::unenrolled(2).unwrap();
    let _pg = [start_postgres(&lab, 1), start_postgres(&lab, 2)];
    let uris: Vec<(String, String)> = (1..=2)
        .map(|i| (format!("vm{i}"), plain_uri(&lab, i)))
        .collect();
    for (_, uri) in &uris {
        lab.psql(uri, "CREATE TABLE probes (node text, at timestamptz)")
            .unwrap();
    }
    let read_only = |i: usize, on: bool| {
        lab.psql(
            &plain_uri(&lab, i),
            &format!("ALTER SYSTEM SET default_transaction_read_only = {on}"),
        )
        .unwrap();
        lab.psql(&plain_uri(&lab, i), "SELECT pg_reload_conf()")
            .unwrap();
    };

    // Two independent writable servers: a split brain.
    let checker = WriteChecker::start(uris.clone(), "probes");
    std::thread::sleep(Duration::from_secs(1));
    let r = checker.finish();
    assert!(r.successes["vm1"] > 5 && r.successes["vm2"] > 5, "{r:?}");
    let v = r.violations();
    assert!(!v.is_empty(), "two writable nodes went unnoticed: {r:?}");
    eprintln!("{} violations, e.g. {}", v.len(), v[0]);
    // About one probe per node every 50 ms.
    assert!(r.probes["vm1"] >= 12, "{:?}", r.probes);

    // vm2 read-only: one writer, no violation.
    read_only(2, true);
    let checker = WriteChecker::start(uris.clone(), "probes");
    std::thread::sleep(Duration::from_secs(1));
    let r = checker.finish();
    assert_eq!(r.violations(), Vec::<String>::new());
    assert!(r.successes["vm1"] > 5, "{r:?}");
    assert_eq!(r.successes["vm2"], 0, "{r:?}");
    assert!(r.last_error["vm2"].contains("read-only"), "{r:?}");

    // A hand-over from vm1 to vm2 while probing: still none.
    let checker = WriteChecker::start(uris.clone(), "probes");
    std::thread::sleep(Duration::from_millis(500));
    read_only(1, true);
    read_only(2, false);
    std::thread::sleep(Duration::from_millis(500));
    let r = checker.finish();
    assert_eq!(r.violations(), Vec::<String>::new());
    assert!(r.successes["vm1"] > 3 && r.successes["vm2"] > 3, "{r:?}");

    // A node the host cannot reach does not hold up the others: vm1's
    // probes hang until their timeouts while vm2 is probed every round.
    lab.cut("vm1", "host").unwrap();
    let checker = WriteChecker::start(uris, "probes");
    std::thread::sleep(Duration::from_secs(1));
    let r = checker.finish();
    assert_eq!(r.successes.get("vm1").copied().unwrap_or(0), 0, "{r:?}");
    assert!(r.probes["vm2"] >= 15, "{:?}", r.probes);
    assert!(
        r.probes.get("vm1").copied().unwrap_or(0) <= 5,
        "{:?}",
        r.probes
    );
}

/// The agents' own health endpoints, HAProxy and the checker on a real
/// primary/replica cluster.
#[test]
fn haproxy_and_the_checker_on_a_real_cluster() {
    let mut lab = Lab::start(2).unwrap();
    let creds = lab.create_replicated("c", "vm1,vm2", &[]).unwrap();
    assert_eq!(
        lab.wait_until_primary("c", Duration::from_secs(10))
            .unwrap(),
        "vm1"
    );
    // The primary may take a moment to hold its lease.
    wait_until(Duration::from_secs(10), "health endpoints", || {
        Ok(lab.health(1, "/primary")? == 200 && lab.health(2, "/replica")? == 200)
    })
    .unwrap();
    assert_eq!(lab.health(2, "/primary").unwrap(), 503);
    assert_eq!(lab.health(1, "/health").unwrap(), 200);

    lab.start_haproxy(&[1, 2]).unwrap();
    wait_until(Duration::from_secs(5), "haproxy to see vm1 primary", || {
        Ok(status(&lab, "primary", "vm1") == "UP"
            && status(&lab, "primary", "vm2") == "DOWN"
            && status(&lab, "replicas", "vm2") == "UP")
    })
    .unwrap();
    let server = |uri: &str| lab.psql(uri, "SELECT host(inet_server_addr())");
    assert_eq!(server(&lab.haproxy_uri(&creds)).unwrap(), lab.vm_ip(1));
    assert_eq!(
        server(&lab.haproxy_replicas_uri(&creds)).unwrap(),
        lab.vm_ip(2)
    );

    // The checker against a real primary and replica: one writer.
    lab.psql(
        &lab.haproxy_uri(&creds),
        "CREATE TABLE probes (node text, at timestamptz)",
    )
    .unwrap();
    let uris = (1..=2)
        .map(|i| (format!("vm{i}"), lab.node_uri(&creds, i)))
        .collect();
    let checker = WriteChecker::start(uris, "probes");
    std::thread::sleep(Duration::from_secs(1));
    let r = checker.finish();
    assert_eq!(r.violations(), Vec::<String>::new());
    assert!(r.successes["vm1"] > 5, "{r:?}");
    assert_eq!(r.successes["vm2"], 0, "{r:?}");
}

#[test]
fn restart_vm_brings_a_killed_replica_back() {
    let mut lab = Lab::start(2).unwrap();
    lab.create_replicated("c", "vm1,vm2", &[]).unwrap();
    assert!(lab.restart_vm(2).is_err(), "restarted a running agent");
    lab.kill_vm(2);
    lab.wait_node_state("vm2", "down", Duration::from_secs(10))
        .unwrap();
    lab.restart_vm(2).unwrap();
    lab.wait_node_state("vm2", "up", Duration::from_secs(30))
        .unwrap();
    lab.wait_streaming("c", "vm2").unwrap();
    assert_eq!(
        lab.wait_until_primary("c", Duration::from_secs(10))
            .unwrap(),
        "vm1"
    );
}

#[test]
fn stress_ng_loads_the_cpu_and_stops_on_drop() {
    fn group(pgid: u32) -> Vec<String> {
        let out = Command::new("pgrep")
            .args(["-g", &pgid.to_string()])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .map(str::to_string)
            .collect()
    }
    let stress = Stress::cpu(2).unwrap();
    let pgid = stress.pid();
    wait_until(Duration::from_secs(5), "two workers", || {
        Ok(group(pgid).len() >= 3)
    })
    .unwrap();
    drop(stress);
    assert_eq!(
        group(pgid),
        Vec::<String>::new(),
        "stress-ng left processes"
    );
}
