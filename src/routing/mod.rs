//! Routing decides app → machine: host normalisation and selection over a catalog
//! snapshot. No I/O, so it can be fuzzed and benchmarked directly. It reads the catalog and
//! nothing else of the request path.

use std::sync::Arc;

use crate::catalog::{AppEntry, Catalog};

pub mod host;
pub mod seal;
pub mod select;

pub use host::{HostError, normalize};

/// Routes requests over the published catalog.
pub struct Router {
    catalog: Arc<Catalog>,
}

impl Router {
    pub fn new(catalog: Arc<Catalog>) -> Self {
        Router { catalog }
    }

    /// The app serving `host` (already normalised), exact name first, then wildcard.
    pub fn app_for(&self, host: &str) -> Option<Arc<AppEntry>> {
        self.catalog.load().route(host).cloned()
    }

    /// The machine for the next exchange, skipping machines already tried, counted in
    /// flight on it; `None` when no routable machine has room under its hard limit.
    pub fn pick(&self, app: &AppEntry, exclude: &[&str]) -> Option<select::Pick> {
        select::acquire(&app.machines, exclude, &app.spec.concurrency)
    }
}
