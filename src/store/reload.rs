//! Background reloads: polls the config file (a valid edit is live within one poll interval, an
//! invalid one is rejected) and re-reads provider key files so rotated Secrets take effect.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::MissedTickBehavior;

use super::ConfigStore;
use crate::config::ConfigSource;

/// Runs until `shutdown` flips. Polling (rather than inotify) also follows the symlink swaps
/// Kubernetes uses to update mounted ConfigMaps and Secrets. `applied_text` is the text the store
/// was built from, so an edit made before the first poll is still seen as a change.
pub fn spawn(
    store: Arc<ConfigStore>,
    file: Option<PathBuf>,
    applied_text: &str,
    poll: Duration,
    mut shutdown: watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    let mut last_seen = Some(applied_text.as_bytes().to_vec());
    tokio::spawn(async move {
        let mut missing_reported = false;
        let mut ticker = tokio::time::interval(poll);
        ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticker.tick() => {}
                _ = shutdown.changed() => return,
            }
            if let Some(path) = &file {
                match tokio::fs::read(path).await {
                    Ok(bytes) => {
                        missing_reported = false;
                        if last_seen.as_deref() != Some(bytes.as_slice()) {
                            let text = String::from_utf8_lossy(&bytes).into_owned();
                            last_seen = Some(bytes);
                            // Rejections are logged and counted by the store.
                            let _ = store.apply(&text, ConfigSource::File(path.clone()));
                        }
                    }
                    Err(err) if !missing_reported => {
                        missing_reported = true;
                        tracing::warn!(path = %path.display(), error = %err, "config file unreadable; the last good config keeps serving");
                    }
                    Err(_) => {}
                }
            }
            let snapshot = store.load();
            for key_file in snapshot.key_files() {
                let key_file = key_file.clone();
                // Key files are tiny, but file IO still stays off the async workers.
                let _ = tokio::task::spawn_blocking(move || key_file.refresh()).await;
            }
        }
    })
}
