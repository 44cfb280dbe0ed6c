/// The page served at `/`.
pub const INDEX_HTML: &str = include_str!("web/index.html");
/// The page's script, served at `/assets/app.js` (also the G-code parser's Web Worker).
pub const APP_JS: &str = include_str!("web/app.js");
/// The page's style sheet, served at `/assets/app.css`.
pub const APP_CSS: &str = include_str!("web/app.css");
