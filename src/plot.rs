//! Small figures for mask analysis: a labelled heatmap and a scatter plot with its least-squares
//! line, drawn as SVG text and rendered to PNG with resvg (text in the system's sans-serif font;
//! without any installed font the PNG has no labels, the SVG always does).

use std::fmt::Write;
use std::path::Path;

use anyhow::{Context, Result};

/// Writes `svg` to `stem.svg` and its rendering to `stem.png`, each atomically.
pub fn write_figure(svg: &str, stem: &Path) -> Result<()> {
    crate::fsio::atomic_write(&stem.with_extension("svg"), |f| std::io::Write::write_all(f, svg.as_bytes()))?;
    let png = render_png(svg).with_context(|| format!("rendering {}", stem.with_extension("png").display()))?;
    crate::fsio::atomic_write(&stem.with_extension("png"), |f| std::io::Write::write_all(f, &png))
}

/// PNG bytes of an SVG drawing at its own size.
pub fn render_png(svg: &str) -> Result<Vec<u8>> {
    use resvg::{tiny_skia, usvg};
    let mut opt = usvg::Options::default();
    let db = opt.fontdb_mut();
    db.load_system_fonts();
    // "sans-serif" resolves to Arial by default; use a sans family this system has.
    let families: Vec<String> = db.faces().flat_map(|f| f.families.iter().map(|(name, _)| name.clone())).collect();
    let preferred = ["DejaVu Sans", "Liberation Sans", "Noto Sans", "Arial", "Helvetica"];
    if let Some(family) = preferred.iter().map(|p| p.to_string()).find(|p| families.contains(p)).or_else(|| families.first().cloned()) {
        db.set_sans_serif_family(family.clone());
        opt.font_family = family;
    }
    let tree = usvg::Tree::from_str(svg, &opt)?;
    let size = tree.size().to_int_size();
    let mut pixmap = tiny_skia::Pixmap::new(size.width(), size.height()).context("empty figure")?;
    resvg::render(&tree, tiny_skia::Transform::default(), &mut pixmap.as_mut());
    Ok(pixmap.encode_png()?)
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

/// A white-to-blue colour for `t` in [0, 1].
fn colour(t: f64) -> String {
    let t = t.clamp(0.0, 1.0);
    let lerp = |a: f64, b: f64| (a + (b - a) * t).round() as u8;
    format!("#{:02x}{:02x}{:02x}", lerp(247.0, 8.0), lerp(251.0, 48.0), lerp(255.0, 107.0))
}

/// A heatmap of `values[row][col]` with its numbers in the cells; colours span the values' range
/// (NaN cells, e.g. a diagonal, are grey and marked "-").
pub fn heatmap(title: &str, rows: &[String], cols: &[String], values: &[Vec<f64>]) -> String {
    let (cell, left, top) = (56.0, 130.0, 60.0);
    let (w, h) = (left + cell * cols.len() as f64 + 20.0, top + cell * rows.len() as f64 + 20.0);
    let finite = values.iter().flatten().copied().filter(|v| v.is_finite());
    let (lo, hi) = finite.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| (a.min(v), b.max(v)));
    let span = if hi > lo { hi - lo } else { 1.0 };
    let mut s = String::new();
    let _ = writeln!(s, r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">"#);
    let _ = writeln!(s, r#"<rect width="{w}" height="{h}" fill="white"/><text x="{left}" y="20" font-size="14">{}</text>"#, escape(title));
    for (j, c) in cols.iter().enumerate() {
        let _ = writeln!(s, r#"<text x="{}" y="{}" text-anchor="middle">{}</text>"#, left + cell * (j as f64 + 0.5), top - 8.0, escape(c));
    }
    for (i, r) in rows.iter().enumerate() {
        let y = top + cell * i as f64;
        let _ = writeln!(s, r#"<text x="{}" y="{}" text-anchor="end">{}</text>"#, left - 8.0, y + cell / 2.0 + 4.0, escape(r));
        for (j, v) in values[i].iter().enumerate() {
            let t = (v - lo) / span;
            let x = left + cell * j as f64;
            let ink = if t > 0.6 { "white" } else { "black" };
            let (fill, label) = if v.is_finite() { (colour(t), format!("{v:.3}")) } else { ("#dddddd".to_string(), "-".to_string()) };
            let _ = writeln!(s, r#"<rect x="{x}" y="{y}" width="{cell}" height="{cell}" fill="{fill}" stroke="white"/>"#);
            let (tx, ty) = (x + cell / 2.0, y + cell / 2.0 + 4.0);
            let _ = writeln!(s, r#"<text x="{tx}" y="{ty}" text-anchor="middle" fill="{ink}" font-size="10">{label}</text>"#);
        }
    }
    s.push_str("</svg>\n");
    s
}

/// A scatter plot of labelled points with the least-squares line through them.
pub fn scatter(title: &str, x_label: &str, y_label: &str, points: &[(f64, f64, String)]) -> String {
    let (w, h, m) = (560.0, 420.0, 60.0);
    let range = |f: fn(&(f64, f64, String)) -> f64| {
        let (lo, hi) = points.iter().map(f).fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| (a.min(v), b.max(v)));
        let pad = ((hi - lo) * 0.08).max(1e-6);
        (lo - pad, hi + pad)
    };
    let ((x0, x1), (y0, y1)) = (range(|p| p.0), range(|p| p.1));
    let px = |x: f64| m + (x - x0) / (x1 - x0) * (w - 2.0 * m);
    let py = |y: f64| h - m - (y - y0) / (y1 - y0) * (h - 2.0 * m);
    let mut s = String::new();
    let _ = writeln!(s, r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">"#);
    let _ = writeln!(s, r#"<rect width="{w}" height="{h}" fill="white"/><text x="{m}" y="24" font-size="14">{}</text>"#, escape(title));
    let _ = writeln!(s, r#"<rect x="{m}" y="{m}" width="{}" height="{}" fill="none" stroke="black"/>"#, w - 2.0 * m, h - 2.0 * m);
    let _ = writeln!(s, r#"<text x="{}" y="{}" text-anchor="middle">{}</text>"#, w / 2.0, h - 20.0, escape(x_label));
    let _ = writeln!(s, r#"<text x="18" y="{}" text-anchor="middle" transform="rotate(-90 18 {0})">{}</text>"#, h / 2.0, escape(y_label));
    for (v, anchor) in [(x0, "start"), (x1, "end")] {
        let _ = writeln!(s, r#"<text x="{}" y="{}" text-anchor="{anchor}" font-size="10">{v:.3}</text>"#, px(v), h - m + 14.0);
    }
    for v in [y0, y1] {
        let _ = writeln!(s, r#"<text x="{}" y="{}" text-anchor="end" font-size="10">{v:.4}</text>"#, m - 4.0, py(v) + 4.0);
    }
    let n = points.len() as f64;
    let (mx, my) = (points.iter().map(|p| p.0).sum::<f64>() / n, points.iter().map(|p| p.1).sum::<f64>() / n);
    let sxx: f64 = points.iter().map(|p| (p.0 - mx).powi(2)).sum();
    if sxx > 0.0 {
        let slope = points.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum::<f64>() / sxx;
        let (ya, yb) = (my + slope * (x0 - mx), my + slope * (x1 - mx));
        let _ =
            writeln!(s, r#"<line x1="{}" y1="{}" x2="{}" y2="{}" stroke="grey" stroke-dasharray="6 4"/>"#, px(x0), py(ya), px(x1), py(yb));
    }
    for (x, y, label) in points {
        let _ = writeln!(s, r#"<circle cx="{}" cy="{}" r="4" fill="steelblue"/>"#, px(*x), py(*y));
        let _ = writeln!(s, r#"<text x="{}" y="{}" font-size="9">{}</text>"#, px(*x) + 6.0, py(*y) - 4.0, escape(label));
    }
    s.push_str("</svg>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heatmap_has_one_cell_per_value_and_escapes_labels() {
        let svg = heatmap(
            "t<1>",
            &["a&b".into(), "c".into()],
            &["0".into(), "1".into(), "2".into()],
            &[vec![0.1, 0.2, 0.3], vec![0.4, 0.5, f64::NAN]],
        );
        assert_eq!(svg.matches("<rect x=").count(), 6);
        assert!(svg.contains("a&amp;b") && svg.contains("t&lt;1&gt;") && svg.ends_with("</svg>\n"));
    }

    #[test]
    fn figures_render_to_png_of_their_size() {
        let svg = heatmap("t", &["r".into()], &["a".into(), "b".into()], &[vec![0.2, 0.9]]);
        let png = render_png(&svg).unwrap();
        let img = resvg::tiny_skia::Pixmap::decode_png(&png).unwrap();
        // 130 + 2 * 56 + 20 wide, 60 + 56 + 20 high; the second cell is dark blue.
        assert_eq!((img.width(), img.height()), (262, 136));
        let px = img.pixel(130 + 56 + 28, 60 + 5).unwrap();
        assert!(px.blue() > px.red() && px.red() < 100, "{px:?}");
    }

    #[test]
    fn scatter_draws_points_and_the_fitted_line() {
        let pts: Vec<(f64, f64, String)> = (0..5).map(|i| (i as f64, 2.0 * i as f64 + 1.0, format!("p{i}"))).collect();
        let svg = scatter("s", "x", "y", &pts);
        assert_eq!(svg.matches("<circle").count(), 5);
        assert_eq!(svg.matches("<line").count(), 1);
    }
}
