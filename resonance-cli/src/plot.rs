//! `resonance plot`: the loss and learning-rate curves of a run as a PNG, drawn with the
//! `image` crate (no font or plotting dependency: labels use a built-in 3×5 pixel font).

use std::path::Path;

use anyhow::{bail, Context, Result};
use image::{Rgb, RgbImage};

const WIDTH: u32 = 900;
const PANEL_HEIGHT: u32 = 300;
const MARGIN: u32 = 60;
const SCALE: u32 = 3;

/// 3×5 glyphs, rows top to bottom, 3 bits per row (MSB left).
fn glyph(c: char) -> Option<[u8; 5]> {
    Some(match c {
        '0' => [7, 5, 5, 5, 7],
        '1' => [2, 6, 2, 2, 7],
        '2' => [7, 1, 7, 4, 7],
        '3' => [7, 1, 7, 1, 7],
        '4' => [5, 5, 7, 1, 1],
        '5' => [7, 4, 7, 1, 7],
        '6' => [7, 4, 7, 5, 7],
        '7' => [7, 1, 1, 1, 1],
        '8' => [7, 5, 7, 5, 7],
        '9' => [7, 5, 7, 1, 7],
        '.' => [0, 0, 0, 0, 2],
        '-' => [0, 0, 7, 0, 0],
        '+' => [0, 2, 7, 2, 0],
        'e' => [7, 5, 7, 4, 7],
        'l' => [4, 4, 4, 4, 7],
        'o' => [0, 7, 5, 5, 7],
        's' => [7, 4, 7, 1, 7],
        'r' => [0, 7, 4, 4, 4],
        't' => [4, 7, 4, 4, 7],
        'p' => [7, 5, 7, 4, 4],
        ' ' => [0, 0, 0, 0, 0],
        _ => return None,
    })
}

fn text(img: &mut RgbImage, x: u32, y: u32, s: &str, color: Rgb<u8>) {
    let mut cx = x;
    for c in s.chars() {
        if let Some(rows) = glyph(c) {
            for (r, bits) in rows.iter().enumerate() {
                for col in 0..3u32 {
                    if bits & (4 >> col) != 0 {
                        for dy in 0..SCALE {
                            for dx in 0..SCALE {
                                let (px, py) = (cx + col * SCALE + dx, y + r as u32 * SCALE + dy);
                                if px < img.width() && py < img.height() {
                                    img.put_pixel(px, py, color);
                                }
                            }
                        }
                    }
                }
            }
        }
        cx += 4 * SCALE;
    }
}

fn line(img: &mut RgbImage, (x0, y0): (f64, f64), (x1, y1): (f64, f64), color: Rgb<u8>) {
    let steps = ((x1 - x0).abs().max((y1 - y0).abs()).ceil() as usize).max(1);
    for i in 0..=steps {
        let t = i as f64 / steps as f64;
        let (x, y) = (x0 + (x1 - x0) * t, y0 + (y1 - y0) * t);
        for (dx, dy) in [(0, 0), (1, 0), (0, 1)] {
            let (px, py) = (x.round() as i64 + dx, y.round() as i64 + dy);
            if px >= 0 && py >= 0 && (px as u32) < img.width() && (py as u32) < img.height() {
                img.put_pixel(px as u32, py as u32, color);
            }
        }
    }
}

fn panel(img: &mut RgbImage, top: u32, name: &str, points: &[(f64, f64)], color: Rgb<u8>) {
    let axis = Rgb([90, 90, 90]);
    let (left, right) = (MARGIN as f64, (WIDTH - 20) as f64);
    let (y_top, y_bottom) = ((top + 20) as f64, (top + PANEL_HEIGHT - 30) as f64);
    line(img, (left, y_top), (left, y_bottom), axis);
    line(img, (left, y_bottom), (right, y_bottom), axis);
    text(img, 8, top + 4, name, Rgb([0, 0, 0]));
    if points.is_empty() {
        return;
    }
    let (x_min, x_max) = (
        points[0].0,
        points[points.len() - 1].0.max(points[0].0 + 1.0),
    );
    let y_min = points.iter().map(|p| p.1).fold(f64::INFINITY, f64::min);
    let y_max = points.iter().map(|p| p.1).fold(f64::NEG_INFINITY, f64::max);
    let span = if y_max > y_min { y_max - y_min } else { 1.0 };
    let to_px = |(x, y): (f64, f64)| {
        (
            left + (x - x_min) / (x_max - x_min) * (right - left),
            y_bottom - (y - y_min) / span * (y_bottom - y_top),
        )
    };
    for pair in points.windows(2) {
        line(img, to_px(pair[0]), to_px(pair[1]), color);
    }
    text(img, 4, y_top as u32, &format!("{y_max:.3e}"), axis);
    text(img, 4, y_bottom as u32 - 15, &format!("{y_min:.3e}"), axis);
    text(
        img,
        left as u32,
        y_bottom as u32 + 8,
        &format!("step {x_min}"),
        axis,
    );
    let end = format!("{x_max}");
    text(
        img,
        right as u32 - end.len() as u32 * 4 * SCALE,
        y_bottom as u32 + 8,
        &end,
        axis,
    );
}

/// Reads `metrics.jsonl` and writes the curves of `loss` and `lr` over `step`.
pub fn plot_run(metrics: &Path, output: &Path) -> Result<()> {
    let text_in = std::fs::read_to_string(metrics)
        .with_context(|| format!("reading {}", metrics.display()))?;
    let mut loss = Vec::new();
    let mut lr = Vec::new();
    for (i, line_text) in text_in.lines().enumerate() {
        if line_text.trim().is_empty() {
            continue;
        }
        let value: serde_json::Value = serde_json::from_str(line_text)
            .with_context(|| format!("{}:{}: not JSON", metrics.display(), i + 1))?;
        let Some(step) = value.get("step").and_then(|s| s.as_f64()) else {
            bail!("{}:{}: no `step` field", metrics.display(), i + 1);
        };
        if let Some(v) = value.get("loss").and_then(|v| v.as_f64()) {
            loss.push((step, v));
        }
        if let Some(v) = value.get("lr").and_then(|v| v.as_f64()) {
            lr.push((step, v));
        }
    }
    if loss.is_empty() {
        bail!("{}: no metrics to plot", metrics.display());
    }
    let mut img = RgbImage::from_pixel(WIDTH, 2 * PANEL_HEIGHT, Rgb([255, 255, 255]));
    panel(&mut img, 0, "loss", &loss, Rgb([31, 119, 180]));
    panel(&mut img, PANEL_HEIGHT, "lr", &lr, Rgb([255, 127, 14]));
    img.save(output)
        .with_context(|| format!("writing {}", output.display()))?;
    Ok(())
}
