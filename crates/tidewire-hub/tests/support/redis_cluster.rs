//! A Redis Cluster of a test's own on loopback: three masters with one
//! replica each (redis-server in cluster mode, joined by
//! `redis-cli --cluster create`), every server stopped by PID when
//! dropped. Needs redis-server and redis-cli (scripts/install-deps);
//! missing, it is a failure, not a skip. Shared by the hub's Redis engine
//! tests and the CLI's cluster tests (`#[path]`).

use std::process::{Command, Stdio};
use std::time::Duration;

pub struct RedisCluster {
    dir: std::path::PathBuf,
    /// Every server: (port, its process, or `None` once killed).
    servers: Vec<(u16, Option<std::process::Child>)>,
}

/// A free port whose cluster bus port (+10000) is free too, both below
/// the ephemeral range: other tests bind port 0 for their servers, and one
/// given a killed master's port would answer for its slots.
fn free_port() -> u16 {
    loop {
        let port = 12000 + (rand::random::<u16>() % 6000);
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok()
            && std::net::TcpListener::bind(("127.0.0.1", port + 10000)).is_ok()
        {
            return port;
        }
    }
}

fn cli(port: u16, args: &[&str]) -> String {
    let output = Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .stderr(Stdio::null())
        .output()
        .expect("redis-cli (scripts/install-deps installs it)");
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[allow(dead_code)] // not every test that includes it uses every part
impl RedisCluster {
    pub fn start(name: &str) -> RedisCluster {
        let dir = std::env::temp_dir().join(format!(
            "tidewire-redis-cluster-{name}-{}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        let mut cluster = RedisCluster {
            dir,
            servers: Vec::new(),
        };
        for _ in 0..6 {
            let mut port = free_port();
            while cluster.servers.iter().any(|&(p, _)| p == port) {
                port = free_port();
            }
            let dir = cluster.dir.join(port.to_string());
            std::fs::create_dir_all(&dir).unwrap();
            let child = Command::new("redis-server")
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                .args(["--cluster-enabled", "yes", "--cluster-node-timeout", "1000"])
                .args(["--cluster-config-file", "nodes.conf"])
                .args(["--save", "", "--appendonly", "no", "--protected-mode", "no"])
                .arg("--dir")
                .arg(&dir)
                .stdout(Stdio::null())
                .spawn()
                .expect("redis-server (scripts/install-deps installs it)");
            cluster.servers.push((port, Some(child)));
        }
        for &(port, _) in &cluster.servers {
            let mut up = false;
            for _ in 0..500 {
                if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                    up = true;
                    break;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            assert!(up, "redis-server did not listen on {port}");
        }
        let nodes: Vec<String> = cluster
            .servers
            .iter()
            .map(|(port, _)| format!("127.0.0.1:{port}"))
            .collect();
        let created = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&nodes)
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("redis-cli (scripts/install-deps installs it)");
        assert!(created.success(), "redis-cli --cluster create failed");
        cluster.wait_until_ok();
        // Every replica in sync with its master, so that a failover loses
        // nothing that was acknowledged before it.
        for _ in 0..1000 {
            let synced = cluster
                .replicas()
                .iter()
                .all(|&port| cli(port, &["info", "replication"]).contains("master_link_status:up"));
            if synced && cluster.replicas().len() == 3 {
                return cluster;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("the replicas did not sync");
    }

    /// The seed URLs of the live servers, comma-separated.
    pub fn urls(&self) -> String {
        self.live()
            .map(|port| format!("redis://127.0.0.1:{port}"))
            .collect::<Vec<_>>()
            .join(",")
    }

    fn live(&self) -> impl Iterator<Item = u16> + '_ {
        self.servers
            .iter()
            .filter(|(_, child)| child.is_some())
            .map(|(port, _)| *port)
    }

    /// The port of the replica of the master on `port`.
    pub fn replica_of(&self, port: u16) -> u16 {
        let Some(live) = self.live().next() else {
            panic!("no live server");
        };
        let listing = cli(live, &["cluster", "nodes"]);
        let lines: Vec<Vec<&str>> = listing
            .lines()
            .map(|l| l.split_whitespace().collect())
            .collect();
        let port_of = |fields: &Vec<&str>| {
            fields
                .get(1)
                .and_then(|a| a.split(['@', ':']).nth(1))
                .and_then(|p| p.parse::<u16>().ok())
        };
        let master_id = lines
            .iter()
            .find(|f| port_of(f) == Some(port))
            .map(|f| f[0])
            .expect("the master is listed");
        lines
            .iter()
            .find(|f| f.get(3) == Some(&master_id))
            .and_then(port_of)
            .expect("the master has a replica")
    }

    /// Stops (SIGSTOP) or continues (SIGCONT) the server on `port`.
    pub fn pause(&self, port: u16, paused: bool) {
        for (p, child) in &self.servers {
            if let (true, Some(child)) = (*p == port, child) {
                let signal = if paused { "-STOP" } else { "-CONT" };
                Command::new("kill")
                    .args([signal, &child.id().to_string()])
                    .status()
                    .unwrap();
            }
        }
    }

    /// `CLUSTER NODES` as a live server sees it: (port, flags, slots).
    fn nodes(&self) -> Vec<(u16, String, String)> {
        let Some(port) = self.live().next() else {
            return Vec::new();
        };
        cli(port, &["cluster", "nodes"])
            .lines()
            .filter_map(|line| {
                let fields: Vec<&str> = line.split_whitespace().collect();
                let port = fields
                    .get(1)?
                    .split(['@', ':'])
                    .nth(1)?
                    .parse::<u16>()
                    .ok()?;
                let slots = fields.get(8..).map(|s| s.join(" ")).unwrap_or_default();
                Some((port, fields.get(2)?.to_string(), slots))
            })
            .collect()
    }

    /// The masters' ports, with the slot ranges each serves.
    pub fn masters(&self) -> Vec<(u16, Vec<(u16, u16)>)> {
        self.nodes()
            .into_iter()
            .filter(|(_, flags, _)| flags.contains("master") && !flags.contains("fail"))
            .map(|(port, _, slots)| {
                let ranges = slots
                    .split_whitespace()
                    .filter_map(|range| {
                        let (from, to) = range.split_once('-').unwrap_or((range, range));
                        Some((from.parse().ok()?, to.parse().ok()?))
                    })
                    .collect();
                (port, ranges)
            })
            .filter(|(_, ranges): &(u16, Vec<(u16, u16)>)| !ranges.is_empty())
            .collect()
    }

    pub fn replicas(&self) -> Vec<u16> {
        self.nodes()
            .into_iter()
            .filter(|(_, flags, _)| flags.contains("slave") && !flags.contains("fail"))
            .map(|(port, _, _)| port)
            .collect()
    }

    /// The port of the master serving `slot`.
    pub fn master_of(&self, slot: u16) -> u16 {
        self.masters()
            .into_iter()
            .find(|(_, ranges)| ranges.iter().any(|&(from, to)| (from..=to).contains(&slot)))
            .map(|(port, _)| port)
            .expect("a master for every slot")
    }

    /// The slot of `key`, as the cluster computes it.
    pub fn slot_of(&self, key: &str) -> u16 {
        let port = self.live().next().unwrap();
        cli(port, &["cluster", "keyslot", key])
            .trim()
            .parse()
            .unwrap()
    }

    /// Runs a command on one server.
    pub fn on(&self, port: u16, args: &[&str]) -> String {
        cli(port, args)
    }

    /// Waits until the replicas of the master on `port` acknowledged
    /// everything it has (replication is asynchronous: what a master took
    /// last is lost when it dies first).
    pub fn wait_replicated(&self, port: u16) {
        for _ in 0..1000 {
            let info = cli(port, &["info", "replication"]);
            let field = |name: &str| {
                info.lines()
                    .find_map(|l| l.strip_prefix(name))
                    .map(|v| v.trim().to_owned())
            };
            let master = field("master_repl_offset:");
            let replica = field("slave0:").and_then(|v| {
                v.split(',')
                    .find_map(|kv| kv.strip_prefix("offset="))
                    .map(str::to_owned)
            });
            if master.is_some() && master == replica {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("the replica of {port} did not catch up");
    }

    /// Kills (SIGKILL) the server on `port`.
    pub fn kill(&mut self, port: u16) {
        for (p, child) in &mut self.servers {
            if *p == port {
                if let Some(mut child) = child.take() {
                    let _ = child.kill();
                    let _ = child.wait();
                }
            }
        }
    }

    /// Waits until every live server reports the cluster ok and every
    /// slot served by a live master.
    pub fn wait_until_ok(&self) {
        for _ in 0..3000 {
            let ok = self
                .live()
                .all(|port| cli(port, &["cluster", "info"]).contains("cluster_state:ok"));
            let served: u32 = self
                .masters()
                .iter()
                .filter(|(port, _)| self.live().any(|p| p == *port))
                .flat_map(|(_, ranges)| ranges.iter().map(|&(from, to)| u32::from(to - from) + 1))
                .sum();
            if ok && served == 16384 {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("the cluster did not become ok: {:?}", self.nodes());
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        let ports: Vec<u16> = self.servers.iter().map(|(p, _)| *p).collect();
        for port in ports {
            self.kill(port);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
