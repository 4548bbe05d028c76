//! SQL over the lake: model templating and the asset graph, and DataFusion sessions in
//! which every lake table is a table (`schema.table`) and every view model a view.

pub mod checks;
pub mod cte;
pub mod explain;
pub mod graph;
pub mod joinmode;
pub mod model;
mod scan;
pub mod scd;
pub mod semijoin;
pub mod session;
pub mod stream;
pub mod stream_sql;
pub mod travel;

pub use graph::{Asset, AssetKind, Graph};
pub use model::{render_model, CompiledModel, RenderMode};
pub use session::lake_session;
