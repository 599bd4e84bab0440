//! A redis-server of the test's own on a loopback port (Debian package `redis-server`;
//! `.ci/run` installs it), for the budget and shared-cache tests.
#![allow(dead_code)]

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A redis-server of its own on 127.0.0.1, without persistence; killed when dropped.
pub struct RedisServer {
    child: Option<Child>,
    pub port: u16,
}

impl RedisServer {
    pub fn start() -> RedisServer {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .unwrap();
        Self::on(port)
    }

    pub fn on(port: u16) -> RedisServer {
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server is needed for these tests (Debian package redis-server; .ci/run installs it)");
        let server = RedisServer {
            child: Some(child),
            port,
        };
        // Poll until it answers PING: it takes a few milliseconds to start listening.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if server.ping() {
                return server;
            }
            assert!(
                Instant::now() < deadline,
                "redis-server did not answer on {port}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    pub fn connection(&self) -> redis::RedisResult<redis::Connection> {
        redis::Client::open(self.url())?.get_connection_with_timeout(Duration::from_secs(1))
    }

    pub fn ping(&self) -> bool {
        self.connection()
            .and_then(|mut c| redis::cmd("PING").query::<String>(&mut c))
            .is_ok()
    }

    /// The budget-day hash as Redis has it: (spent, reserved) in nano-USD.
    pub fn counts(&self, key: &str) -> (i64, i64) {
        let mut c = self.connection().unwrap();
        let (spent, reserved): (Option<i64>, Option<i64>) = redis::cmd("HMGET")
            .arg(key)
            .arg("spent")
            .arg("reserved")
            .query(&mut c)
            .unwrap();
        (spent.unwrap_or(0), reserved.unwrap_or(0))
    }

    /// The keys matching `pattern` (`KEYS`: fine for a test's own small server).
    pub fn keys(&self, pattern: &str) -> Vec<String> {
        let mut c = self.connection().unwrap();
        let mut keys: Vec<String> = redis::cmd("KEYS").arg(pattern).query(&mut c).unwrap();
        keys.sort();
        keys
    }

    /// Milliseconds until `key` expires (-1: never, -2: no such key).
    pub fn pttl(&self, key: &str) -> i64 {
        let mut c = self.connection().unwrap();
        redis::cmd("PTTL").arg(key).query(&mut c).unwrap()
    }

    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}
