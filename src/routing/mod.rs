//! Routing decides app → machine: host normalisation and selection over a catalog
//! snapshot. No I/O, so it can be fuzzed and benchmarked directly. It reads the catalog and
//! nothing else of the request path.

use std::sync::Arc;

use crate::catalog::{AppEntry, Catalog, Machine};

pub mod host;
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

    /// The machine for the next exchange, skipping machines already tried.
    pub fn pick(&self, app: &AppEntry, exclude: &[&str]) -> Option<Arc<Machine>> {
        select::least_in_flight(&app.machines, exclude).cloned()
    }
}
