//! llm-sidecar: a per-pod proxy that routes an app's OpenAI-compatible LLM calls between a relay
//! and the official provider APIs, driven by flags in one hot-swapped config snapshot.
#![forbid(unsafe_code)]

pub mod admin;
pub mod bench_providers;
pub mod body;
pub mod cache;
pub mod cli;
pub mod config;
pub mod env;
pub mod errors;
pub mod inject;
pub mod openai;
pub mod outbound;
pub mod path;
pub mod probe;
pub mod providers;
pub mod proxy;
pub mod redis_link;
pub mod roi;
pub mod routing;
pub mod settings;
pub mod shadow;
pub mod spend;
pub mod store;
pub mod telemetry;
pub mod upstream;

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use prometheus_client::registry::Registry;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use config::{ConfigError, ConfigSource, EMBEDDED_DEFAULT};
use settings::{Env, Settings};
use store::ConfigStore;
use telemetry::metrics::Metrics;

/// Why the sidecar could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("invalid routing config ({source_name}): {error}")]
    Config {
        source_name: String,
        error: ConfigError,
    },
    #[error("cannot read the config file {path}: {error}")]
    ConfigFile { path: String, error: std::io::Error },
    #[error("cannot listen on {addr}: {error}")]
    Bind {
        addr: SocketAddr,
        error: std::io::Error,
    },
    #[error("cannot build the upstream client: {0}")]
    Client(std::io::Error),
    #[error(
        "cannot set up Redis (LLM_SIDECAR_REDIS_URL) for budgets and the cache's shared tier: {0}"
    )]
    BudgetStore(String),
    #[error("cannot set up the Kubernetes client for the ConfigMap watch ({hint}): {error}")]
    Kube { hint: String, error: String },
}

/// The Kubernetes client: the kubeconfig named by `KUBECONFIG`, else in-cluster config. The
/// namespace is `POD_NAMESPACE`, else the service-account namespace (in cluster) or the
/// kubeconfig context's namespace.
async fn kube_client(
    kube: &settings::KubeSettings,
) -> Result<(kube::Client, store::configmap::ConfigMapRef), StartError> {
    let hint = "set LLM_SIDECAR_CONFIGMAP=off to run without it";
    let fail = |error: String| StartError::Kube {
        hint: hint.to_string(),
        error,
    };
    let mut config = match &kube.kubeconfig {
        Some(path) => {
            let kubeconfig = kube::config::Kubeconfig::read_from(path)
                .map_err(|e| fail(format!("kubeconfig {}: {e}", path.display())))?;
            kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
                .await
                .map_err(|e| fail(format!("kubeconfig {}: {e}", path.display())))?
        }
        None => kube::Config::incluster().map_err(|e| fail(format!("in-cluster config: {e}")))?,
    };
    // Reconnects after an API server restart should not wait on a long TCP connect timeout.
    config.connect_timeout = Some(std::time::Duration::from_secs(5));
    let namespace = kube
        .namespace
        .clone()
        .unwrap_or_else(|| config.default_namespace.clone());
    let client = kube::Client::try_from(config).map_err(|e| fail(e.to_string()))?;
    Ok((
        client,
        store::configmap::ConfigMapRef {
            namespace,
            name: kube.configmap.clone(),
        },
    ))
}

/// Reads the config named by the settings, or the embedded default.
pub fn initial_config(settings: &Settings) -> Result<(String, ConfigSource), StartError> {
    match &settings.config_path {
        Some(path) => std::fs::read_to_string(path)
            .map(|text| (text, ConfigSource::File(path.clone())))
            .map_err(|error| StartError::ConfigFile {
                path: path.display().to_string(),
                error,
            }),
        None => Ok((EMBEDDED_DEFAULT.to_string(), ConfigSource::Embedded)),
    }
}

/// A running sidecar: data port, admin port and config reloader.
pub struct Sidecar {
    pub data_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub store: Arc<ConfigStore>,
    /// The daily spend budgets' counts, for the request path.
    pub spend: Arc<spend::Spend>,
    shutdown: watch::Sender<bool>,
    task: JoinHandle<bool>,
}

impl Sidecar {
    /// Validates the config, binds both ports and starts serving. `env` supplies provider keys.
    pub async fn start(
        settings: &Settings,
        config_text: &str,
        source: ConfigSource,
        env: Arc<dyn Env + Send + Sync>,
    ) -> Result<Sidecar, StartError> {
        let mut registry = Registry::default();
        let metrics = Arc::new(Metrics::register(&mut registry));
        let store = ConfigStore::with_override(
            config_text,
            source.clone(),
            settings.holy_sheep_enabled,
            env,
            metrics.clone(),
        )
        .map(Arc::new)
        .map_err(|error| StartError::Config {
            source_name: source.to_string(),
            error,
        })?;
        let bind = |addr: SocketAddr| {
            proxy::server::listen(addr).map_err(|error| StartError::Bind { addr, error })
        };
        let data_listener = bind(settings.listen)?;
        let admin_listener = bind(settings.admin_listen)?;
        let data_addr = data_listener
            .local_addr()
            .map_err(|error| StartError::Bind {
                addr: settings.listen,
                error,
            })?;
        let admin_addr = admin_listener
            .local_addr()
            .map_err(|error| StartError::Bind {
                addr: settings.admin_listen,
                error,
            })?;

        let upstream = upstream::Upstream::for_workers(
            settings.connect_timeout,
            settings.extra_ca_file.as_deref(),
            settings.workers,
        )
        .map_err(StartError::Client)?;
        // One link to Redis for the budgets and the cache's shared tier: one connection, one
        // up/down state. Both watch it before it first connects.
        let link = match &settings.redis {
            None => None,
            Some(redis) => Some(Arc::new(
                redis_link::RedisLink::new(redis).map_err(StartError::BudgetStore)?,
            )),
        };
        let spend = match &link {
            None => {
                if !store.load().budgets.list.is_empty() {
                    tracing::info!("budgets are per sidecar (in memory): set LLM_SIDECAR_REDIS_URL to share them across replicas");
                }
                spend::Spend::new(spend::Store::Memory, metrics.clone())
            }
            Some(link) => spend::Spend::new(
                spend::Store::redis_on(link.clone(), metrics.clone()),
                metrics.clone(),
            ),
        };
        let tier = link
            .as_ref()
            .map(|link| cache::SharedTier::new(link.clone(), metrics.clone()));
        if let Some(link) = &link {
            link.start().await;
        }
        let core = Arc::new(proxy::execute::Core {
            upstream,
            health: Default::default(),
            budget: routing::budget::RetryBudget::new(std::time::Duration::from_secs(10)),
            metrics: metrics.clone(),
            guard: routing::guard::Guard::new(metrics.clone()),
            shadows: Arc::new(shadow::Shadows::new(metrics.clone())),
            cache: {
                let evictions = metrics.cache.evictions.clone();
                cache::Shared::new(
                    config::cache::DEFAULT_MAX_BYTES,
                    Arc::new(move || {
                        evictions.inc();
                    }),
                    tier,
                )
            },
            spend: spend.clone(),
        });
        let proxy = Arc::new(proxy::Proxy::new(
            store.clone(),
            core.clone(),
            proxy::Limits {
                max_body_bytes: settings.max_body_bytes,
                body_read_timeout: settings.body_read_timeout,
                max_concurrency: settings.max_concurrency,
            },
        ));
        let (shutdown, shutdown_rx) = watch::channel(false);
        let prober_core = core.clone();
        let prober_store = store.clone();
        let mut prober_stop = shutdown_rx.clone();
        tokio::spawn(async move {
            let upstream = prober_core.upstream.clone();
            proxy::prober::run(
                &prober_core.health,
                || prober_store.load(),
                |provider, timeout| proxy::prober::reachable(upstream.clone(), provider, timeout),
                async move {
                    let _ = prober_stop.wait_for(|stop| *stop).await;
                },
            )
            .await
        });
        let configmap = match &settings.kube {
            None => None,
            Some(kube) => {
                let (client, target) = kube_client(kube).await?;
                tracing::info!(namespace = %target.namespace, name = %target.name, "watching the routing ConfigMap");
                let status = store::configmap::WatchStatus::new(target.clone(), metrics.clone());
                let events = Arc::new(store::configmap::KubeEvents::new(
                    client.clone(),
                    target,
                    kube.instance.clone(),
                ));
                core.guard.set_sink(events.clone());
                spend.set_sink(events.clone());
                store::configmap::spawn(
                    client,
                    store.clone(),
                    status.clone(),
                    events,
                    shutdown_rx.clone(),
                );
                let waiting = status.clone();
                let timeout = kube.startup_timeout;
                tokio::spawn(async move { waiting.wait_ready_or_fall_back(timeout).await });
                Some(status)
            }
        };
        let admin = Arc::new(admin::Admin {
            store: store.clone(),
            core,
            spend: spend.clone(),
            registry,
            serving: Default::default(),
            configmap,
        });

        let (admin_stop, admin_stop_rx) = watch::channel(false);
        let builder = proxy::server::builder(settings.header_read_timeout);
        let grace = settings.shutdown_grace;
        let data = tokio::spawn(proxy::server::serve_on_workers(
            data_listener,
            builder.clone(),
            // Boxed: hyper keeps room for a connection's request future from its first
            // request to its close, so an unboxed one would cost every open stream and idle
            // keep-alive connection its full size; boxed, it is freed once the answer's head
            // is out.
            move |req, _peer| Box::pin(proxy.clone().handle(req)),
            shutdown_rx.clone(),
            grace,
            settings.workers,
        ));
        let admin_for_server = admin.clone();
        let admin_server = tokio::spawn(proxy::server::serve(
            admin_listener,
            builder,
            move |req, _peer| admin_for_server.clone().handle(req),
            admin_stop_rx,
            std::time::Duration::from_secs(1),
        ));
        store::reload::spawn(
            store.clone(),
            settings.config_path.clone(),
            config_text,
            settings.config_poll,
            shutdown_rx.clone(),
        );
        admin.serving.store(true, Ordering::Release);
        tracing::info!(%data_addr, %admin_addr, source = %source, "llm-sidecar serving");

        let mut draining = shutdown_rx;
        let task = tokio::spawn(async move {
            // Readiness drops as soon as draining starts; the admin port stays up until the
            // data port has drained so probes keep answering.
            let _ = draining.wait_for(|stop| *stop).await;
            admin.serving.store(false, Ordering::Release);
            let drained = data.await.unwrap_or(false);
            let _ = admin_stop.send(true);
            let _ = admin_server.await;
            drained
        });
        Ok(Sidecar {
            data_addr,
            admin_addr,
            store,
            spend,
            shutdown,
            task,
        })
    }

    /// Stops accepting and starts draining in-flight requests.
    pub fn shutdown(&self) {
        let _ = self.shutdown.send(true);
    }

    /// Waits until the sidecar has stopped; true when every in-flight request finished in time.
    pub async fn wait(self) -> bool {
        self.task.await.unwrap_or(false)
    }
}
