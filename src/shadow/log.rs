//! The shadow log, written off the request path: comparisons hand their lines to a writer
//! thread through a bounded queue, so a slow disk never stalls a data-port worker. A line that
//! finds the queue full is dropped and counted, never waited for.

use std::io::Write;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::OnceLock;

use prometheus_client::metrics::counter::Counter;

/// Lines waiting for the writer; past this, new ones are dropped (and counted).
const QUEUE: usize = 4096;

/// Where a line goes (`-` for stdout, else a file appended to) and the line itself.
type Line = (String, String);

pub struct ShadowLog {
    queue: OnceLock<Option<SyncSender<Line>>>,
    dropped: Counter,
}

impl ShadowLog {
    pub fn new(dropped: Counter) -> ShadowLog {
        ShadowLog {
            queue: OnceLock::new(),
            dropped,
        }
    }

    /// Queues `line` (ending in a newline) for `destination`; never blocks.
    pub fn write(&self, destination: &str, line: String) {
        let Some(queue) = self.queue.get_or_init(start_writer) else {
            self.dropped.inc();
            return;
        };
        match queue.try_send((destination.to_string(), line)) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                self.dropped.inc();
                tracing::debug!("the shadow log is behind: a line was dropped");
            }
            Err(TrySendError::Disconnected(_)) => {
                self.dropped.inc();
            }
        }
    }
}

fn start_writer() -> Option<SyncSender<Line>> {
    let (tx, rx) = sync_channel(QUEUE);
    match std::thread::Builder::new()
        .name("shadow-log".into())
        .spawn(move || write_lines(rx))
    {
        Ok(_) => Some(tx),
        Err(err) => {
            tracing::warn!(error = %err, "cannot start the shadow log writer; shadow lines are dropped");
            None
        }
    }
}

/// The writer thread: keeps the file of the last destination open, reopens when it changes.
fn write_lines(lines: Receiver<Line>) {
    let mut open: Option<(String, std::fs::File)> = None;
    for (destination, text) in lines {
        if destination == "-" {
            let _ = std::io::stdout().lock().write_all(text.as_bytes());
            continue;
        }
        if open.as_ref().is_none_or(|(path, _)| *path != destination) {
            match std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&destination)
            {
                Ok(file) => open = Some((destination.clone(), file)),
                Err(err) => {
                    tracing::warn!(path = %destination, error = %err, "cannot open the shadow log");
                    open = None;
                    continue;
                }
            }
        }
        if let Some((_, file)) = open.as_mut() {
            if let Err(err) = file.write_all(text.as_bytes()) {
                tracing::warn!(path = %destination, error = %err, "cannot write the shadow log");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_reach_the_file_in_order_without_the_caller_waiting() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("shadow.jsonl");
        let log = ShadowLog::new(Counter::default());
        let destination = path.to_string_lossy().into_owned();
        for i in 0..100 {
            log.write(&destination, format!("{{\"n\":{i}}}\n"));
        }
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let text = loop {
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            if text.lines().count() == 100 || std::time::Instant::now() > deadline {
                break text;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        };
        let numbers: Vec<usize> = text
            .lines()
            .map(|l| {
                l.trim_start_matches("{\"n\":")
                    .trim_end_matches('}')
                    .parse()
                    .unwrap()
            })
            .collect();
        assert_eq!(numbers, (0..100).collect::<Vec<_>>());
        assert_eq!(log.dropped.get(), 0);
    }
}
