//! One upstream call for identical concurrent requests: the first request for a key leads and
//! calls the provider; the others wait for its answer and are served from the cache. When the
//! leader gets no storable answer, the waiters go on without it (one of them leads next).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::watch;

use super::key::Key;
use super::store::Entry;

/// The requests in flight, by key.
#[derive(Default)]
pub struct Flights {
    leaders: Mutex<HashMap<Key, watch::Receiver<Landed>>>,
}

/// What a leader's call came to.
#[derive(Clone, Debug, Default)]
pub enum Landed {
    #[default]
    Flying,
    Stored(Arc<Entry>),
    /// No storable answer: an error, a cut stream, a content filter, a client that left.
    Nothing,
}

/// The first request for its key: it calls the provider and says what came of it.
pub struct Leader {
    flights: Arc<Flights>,
    key: Key,
    tx: watch::Sender<Landed>,
    done: bool,
}

/// A request that found an identical one in flight.
pub struct Waiter {
    rx: watch::Receiver<Landed>,
}

pub enum Joined {
    Leader(Leader),
    Waiter(Waiter),
}

impl Flights {
    /// Joins the flight for `key`, or leads a new one.
    pub fn join(self: &Arc<Self>, key: Key) -> Joined {
        let mut leaders = self.leaders.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(rx) = leaders.get(&key) {
            return Joined::Waiter(Waiter { rx: rx.clone() });
        }
        let (tx, rx) = watch::channel(Landed::Flying);
        leaders.insert(key, rx);
        Joined::Leader(Leader {
            flights: self.clone(),
            key,
            tx,
            done: false,
        })
    }

    /// Requests leading a flight now.
    pub fn len(&self) -> usize {
        self.leaders.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Leader {
    /// The answer was stored: every waiter is served it.
    pub fn landed(mut self, entry: Arc<Entry>) {
        self.land(Landed::Stored(entry));
    }

    fn land(&mut self, landed: Landed) {
        if std::mem::replace(&mut self.done, true) {
            return;
        }
        // The flight leaves the map first, so a request after this one finds the cache.
        self.flights
            .leaders
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.key);
        let _ = self.tx.send(landed);
    }
}

impl Drop for Leader {
    /// A leader that ends without storing an answer lets its waiters go on their own.
    fn drop(&mut self) {
        self.land(Landed::Nothing);
    }
}

impl Waiter {
    /// The leader's stored answer, or `None` when it got none.
    pub async fn wait(mut self) -> Option<Arc<Entry>> {
        loop {
            match &*self.rx.borrow_and_update() {
                Landed::Stored(entry) => return Some(entry.clone()),
                Landed::Nothing => return None,
                Landed::Flying => {}
            }
            if self.rx.changed().await.is_err() {
                return None;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::answer::Stored;
    use crate::cache::key::Mode;
    use crate::cache::store::{Cache, Policy};
    use bytes::Bytes;
    use std::time::Duration;

    fn key() -> Key {
        let parsed = crate::openai::RequestBody::parse(br#"{"model":"m","messages":[]}"#).unwrap();
        Key::of("m", "/v1/chat/completions", &parsed).unwrap()
    }

    #[tokio::test]
    async fn waiters_get_the_leaders_answer_and_the_next_request_leads_again() {
        let flights = Arc::new(Flights::default());
        let Joined::Leader(leader) = flights.join(key()) else {
            panic!("the first request leads");
        };
        let waiters: Vec<_> = (0..49)
            .map(|_| match flights.join(key()) {
                Joined::Waiter(w) => tokio::spawn(w.wait()),
                Joined::Leader(_) => panic!("only one leader per key"),
            })
            .collect();
        let cache = Cache::new(1 << 20, || {});
        let body = r#"{"object":"chat.completion","choices":[{"message":{"content":"hi"},"finish_reason":"stop"}]}"#;
        let policy = Policy {
            ttl: Duration::from_secs(60),
            max_stale: Duration::from_secs(60),
            mode: Mode::Always,
        };
        let stored = Stored::from_plain(Bytes::from(body)).unwrap();
        leader.landed(cache.put(key(), stored, None, &policy, tokio::time::Instant::now()));
        for w in waiters {
            let entry = w.await.unwrap().expect("every waiter is served");
            assert_eq!(entry.answer.body, Bytes::from(body));
        }
        assert!(flights.is_empty());
        assert!(matches!(flights.join(key()), Joined::Leader(_)));
    }

    #[tokio::test]
    async fn a_leader_without_an_answer_releases_its_waiters() {
        let flights = Arc::new(Flights::default());
        let leader = flights.join(key());
        let Joined::Waiter(waiter) = flights.join(key()) else {
            panic!("a waiter");
        };
        let waiting = tokio::spawn(waiter.wait());
        drop(leader);
        assert!(waiting.await.unwrap().is_none());
        assert!(flights.is_empty());
    }
}
