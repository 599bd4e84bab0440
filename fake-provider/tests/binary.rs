//! The `llm-sidecar-fake-provider` binary as the demo, bench, soak, Python tests and kind e2e run
//! it: prints the `fake provider listening on URL` line they wait for, answers on that URL, exits
//! 0 on SIGTERM, and rejects bad arguments with exit 64.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_llm-sidecar-fake-provider");

#[test]
fn prints_its_url_serves_on_it_and_exits_0_on_sigterm() {
    let mut child = Command::new(BIN)
        .args(["--listen", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("the fake provider starts");
    let mut stdout = BufReader::new(child.stdout.take().expect("stdout"));
    let mut line = String::new();
    stdout.read_line(&mut line).expect("a first line");
    let url = line
        .trim_end()
        .strip_prefix("fake provider listening on ")
        .unwrap_or_else(|| panic!("not the listening line: {line:?}"));
    let addr = url.strip_prefix("http://").expect("an http URL");
    assert!(
        !addr.ends_with(":0"),
        "the URL names the port picked: {url}"
    );

    let body = r#"{"model":"deepseek-chat+tokens=3","messages":[{"role":"user","content":"hi"}]}"#;
    let mut stream = TcpStream::connect(addr).expect("connects");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    write!(
        stream,
        "POST /deepseek/v1/chat/completions HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/json\r\n\
         content-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("a response");
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert!(response.contains("x-fake-provider: deepseek"), "{response}");
    assert!(response.contains("\"chat.completion\""), "{response}");

    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill runs");
    assert!(killed.success());
    assert_eq!(child.wait().expect("it exits").code(), Some(0));
}

#[test]
fn bad_arguments_exit_64_with_the_usage() {
    for args in [
        &["--listen", "nowhere"][..],
        &["--frobnicate"],
        &["--listen"],
    ] {
        let out = Command::new(BIN).args(args).output().expect("runs");
        assert_eq!(out.status.code(), Some(64), "{args:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("usage:"), "{stderr}");
    }
    let out = Command::new(BIN).arg("--help").output().expect("runs");
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("--listen ADDR"));
}
