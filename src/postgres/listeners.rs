//! The listeners of the database routes, across reloads.
//!
//! A reload changes them in two steps, as nginx does. [`Listeners::plan`] runs before the
//! reload commits: it binds every listener the new configuration needs and does not have
//! yet. If one cannot be bound, the reload is rejected and nothing changes (the listeners
//! bound for it close as the plan is dropped). [`Listeners::apply`] runs after the new
//! generation is in force: added routes start accepting, the listeners of removed and
//! moved routes close.
//!
//! - unchanged route (same name, same `listen`): keeps its listener; its connections are
//!   not touched;
//! - added route: a new listener;
//! - moved route (same name, new `listen`): a new listener; the old one closes; open
//!   sessions go on for as long as the new generation allows them;
//! - removed route: its listener closes; its open sessions end with `access-revoked` when
//!   they re-evaluate against the new generation (the route is gone).
//!
//! A listener whose address (a fixed port) a route of the new configuration asks for while
//! its own route is removed or moved is handed to that route instead of being closed, so
//! renaming a route or swapping two routes' addresses needs no second bind of a port still
//! held.

use std::net::SocketAddr;
use std::sync::Arc;

use parking_lot::Mutex;
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};

use super::{BoundDatabases, Hub};
use crate::config::Config;
use crate::server::per_client::PerClient;

/// One database route's listener.
struct Listening {
    route: Arc<str>,
    /// What the configuration asked for (port 0: any).
    configured: SocketAddr,
    /// Where it is bound.
    local: SocketAddr,
    /// The route its accept loop serves; dropping it closes the listener.
    ctl: watch::Sender<Arc<str>>,
}

/// Where a route of a new configuration gets its listener.
enum Source {
    /// The listener that is serving the route with this name now.
    Current(Arc<str>),
    /// A listener bound for the new configuration.
    Bound(TcpListener),
}

/// The listeners of a configuration not yet in force, every new one already bound.
pub struct ListenerPlan {
    /// In configuration order: route, its configured address, its listener.
    routes: Vec<(Arc<str>, SocketAddr, Source)>,
}

impl std::fmt::Debug for ListenerPlan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let bound = self.routes.iter().filter(|r| matches!(r.2, Source::Bound(_))).count();
        f.debug_struct("ListenerPlan")
            .field("routes", &self.routes.len())
            .field("newly_bound", &bound)
            .finish()
    }
}

/// The database listeners of a running server and their accept loops.
pub struct Listeners {
    hub: Arc<Hub>,
    limit: Arc<Semaphore>,
    per_client: Arc<PerClient>,
    shutdown: watch::Receiver<bool>,
    current: Mutex<Vec<Listening>>,
    tasks: Mutex<tokio::task::JoinSet<()>>,
}

impl std::fmt::Debug for Listeners {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("postgres::Listeners").field("bound", &self.bound()).finish()
    }
}

impl Listeners {
    /// No listeners yet; `limit` and `per_client` are shared with every other listener
    /// of the server.
    pub fn new(
        hub: Arc<Hub>,
        limit: Arc<Semaphore>,
        per_client: Arc<PerClient>,
        shutdown: watch::Receiver<bool>,
    ) -> Self {
        Listeners {
            hub,
            limit,
            per_client,
            shutdown,
            current: Mutex::new(Vec::new()),
            tasks: Mutex::new(tokio::task::JoinSet::new()),
        }
    }

    /// Binds what `config` needs beyond the listeners there are. Callers serialize plans
    /// and applies (the reload lock).
    pub async fn plan(&self, config: &Config) -> Result<ListenerPlan, String> {
        let current: Vec<(Arc<str>, SocketAddr)> =
            self.current.lock().iter().map(|l| (l.route.clone(), l.configured)).collect();
        let keeps = |d: &crate::config::DatabaseSettings| {
            current.iter().any(|(r, a)| *r == d.name && *a == d.listen)
        };
        // First the routes that keep their listener, so none of those is handed over.
        let mut taken: Vec<Arc<str>> =
            config.databases.iter().filter(|d| keeps(d)).map(|d| d.name.clone()).collect();
        let mut routes = Vec::with_capacity(config.databases.len());
        for d in &config.databases {
            if keeps(d) {
                routes.push((d.name.clone(), d.listen, Source::Current(d.name.clone())));
                continue;
            }
            // A fixed address held by a route that is removed or moved: take it over.
            let held = (d.listen.port() != 0)
                .then(|| current.iter().find(|(r, a)| *a == d.listen && !taken.contains(r)))
                .flatten();
            if let Some((r, _)) = held {
                taken.push(r.clone());
                routes.push((d.name.clone(), d.listen, Source::Current(r.clone())));
                continue;
            }
            let l = TcpListener::bind(d.listen).await.map_err(|e| {
                format!("database route `{}`: cannot listen on {}: {e}", d.name, d.listen)
            })?;
            routes.push((d.name.clone(), d.listen, Source::Bound(l)));
        }
        Ok(ListenerPlan { routes })
    }

    /// Puts a plan in force: new listeners start accepting, listeners no route of the plan
    /// uses close, handed-over listeners serve their new route.
    pub fn apply(&self, plan: ListenerPlan) {
        let mut old = std::mem::take(&mut *self.current.lock());
        let mut next = Vec::with_capacity(plan.routes.len());
        let mut tasks = self.tasks.lock();
        // Reap the accept loops that are done (closed listeners whose sessions ended).
        while tasks.try_join_next().is_some() {}
        for (route, configured, source) in plan.routes {
            match source {
                Source::Current(held_by) => {
                    let Some(i) = old.iter().position(|l| l.route == held_by) else {
                        // Plans and applies are serialized, so the listener is there.
                        tracing::error!(route = %route, "database listener vanished during a reload");
                        continue;
                    };
                    let mut l = old.swap_remove(i);
                    if l.route != route {
                        tracing::info!(route = %route, from = %l.route, addr = %l.local, "database listener handed over to another route");
                        l.ctl.send_replace(route.clone());
                        l.route = route;
                    }
                    l.configured = configured;
                    next.push(l);
                }
                Source::Bound(listener) => {
                    let local = listener.local_addr().unwrap_or(configured);
                    let (ctl, rx) = watch::channel(route.clone());
                    tracing::info!(route = %route, addr = %local, "database route listening");
                    tasks.spawn(self.hub.clone().serve(
                        listener,
                        rx,
                        self.limit.clone(),
                        self.per_client.clone(),
                        self.shutdown.clone(),
                    ));
                    next.push(Listening { route, configured, local, ctl });
                }
            }
        }
        drop(tasks);
        for l in old {
            let moved = next.iter().any(|n| n.route == l.route);
            tracing::info!(
                route = %l.route,
                addr = %l.local,
                "database listener closed: the route was {}",
                if moved { "moved" } else { "removed" }
            );
            // Dropping `ctl` stops the accept loop; its sessions go on (see `Hub::serve`).
        }
        *self.current.lock() = next;
    }

    /// Each database route and where it listens now, in configuration order.
    pub fn bound(&self) -> BoundDatabases {
        self.current.lock().iter().map(|l| (l.route.clone(), l.local)).collect()
    }

    /// After shutdown was signalled: waits for every accept loop and its sessions.
    pub async fn drained(&self) {
        let mut tasks = std::mem::take(&mut *self.tasks.lock());
        while tasks.join_next().await.is_some() {}
    }
}
