//! Image loading and CLIP-style preprocessing that reproduces transformers' image processors
//! bit for bit (up to the float rounding documented below).
//!
//! # Loading
//! [`load_image`] decodes by content (not by extension) and converts to 8-bit RGB the way
//! transformers' `load_image` does: EXIF orientation applied (`ImageOps.exif_transpose`), then
//! PIL's `convert("RGB")`, which *drops* alpha (no compositing), replicates grey, expands
//! palettes and keeps the high byte of 16-bit RGB(A). [`LoadOptions`] can instead composite
//! transparency onto white, as transformers 5's processors do when they are handed a PIL image
//! that has an alpha channel (`convert_to_rgb`), using PIL's `alpha_composite` arithmetic.
//!
//! # Preprocessing
//! [`ClipImageProcessor`] runs: optional LLaVA pad-to-square (mean colour, `int(x * 255)`,
//! centred with the extra pixel on the right/bottom), resize (shortest edge or exact size),
//! centre crop, rescale + normalise, giving CHW `f32` [`PixelValues`].
//!
//! Two backends reproduce the two implementations transformers has:
//! * [`ProcessorBackend::Torchvision`] (default; transformers 5.x uses the torchvision
//!   "fast" processors by default): resize as `torchvision.transforms.v2.functional.resize`
//!   with `antialias=True` on a `uint8` tensor on an AVX2/AVX-512 CPU, i.e. PyTorch's
//!   separable uint8 kernel (horizontal then vertical pass, `int16` weights whose precision is
//!   chosen from the largest weight, rounding to `uint8` between the passes); centre crop with
//!   zero padding split `floor` left/top; rescale and normalise **fused** in `f32`:
//!   `(x - mean*255) / (std*255)` with `mean*255` and `std*255` computed in `f32`
//!   (transformers' `_fuse_mean_std_and_rescale_factor`, then `tvF.normalize`).
//! * [`ProcessorBackend::Pil`]: transformers' PIL/NumPy processors: `Image.resize` (Pillow 13's
//!   `Resample.c`: separable, support scaled by the downscale factor, 22-bit fixed-point
//!   coefficients, clamping to `uint8` between passes, pass order as documented on [`resize`]);
//!   centre crop with `ceil` padding
//!   top/left; rescale in `f64` then cast to `f32` (`image.astype(float64) * scale`), then
//!   `(x - mean) / std` in `f32`.
//!
//! The bicubic kernel is Keys' cubic with `a = -0.5` in both (PIL's and PyTorch's antialiasing
//! kernels); bilinear is the triangle filter.

use std::io::Cursor;
use std::path::Path;

use image::metadata::Orientation;
use image::{DynamicImage, ImageDecoder, ImageReader};
use serde_json::Value;

use crate::error::{read_json_opt, CoreError, Result};

/// An 8-bit RGB image, row-major, 3 bytes per pixel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RgbImage {
    width: usize,
    height: usize,
    data: Vec<u8>,
}

impl RgbImage {
    /// Wraps interleaved RGB bytes (`width * height * 3` of them).
    pub fn from_raw(width: usize, height: usize, data: Vec<u8>) -> Result<Self> {
        let expected = width
            .checked_mul(height)
            .and_then(|n| n.checked_mul(3))
            .ok_or_else(|| CoreError::InvalidInput("image dimensions overflow".into()))?;
        if data.len() != expected {
            return Err(CoreError::InvalidInput(format!(
                "RGB image of {width}x{height} needs {expected} bytes, got {}",
                data.len()
            )));
        }
        Ok(RgbImage {
            width,
            height,
            data,
        })
    }

    /// A `width` x `height` image filled with one colour.
    pub fn filled(width: usize, height: usize, rgb: [u8; 3]) -> Self {
        let mut data = Vec::with_capacity(width * height * 3);
        for _ in 0..width * height {
            data.extend_from_slice(&rgb);
        }
        RgbImage {
            width,
            height,
            data,
        }
    }

    /// Width in pixels.
    pub fn width(&self) -> usize {
        self.width
    }

    /// Height in pixels.
    pub fn height(&self) -> usize {
        self.height
    }

    /// The interleaved RGB bytes.
    pub fn as_raw(&self) -> &[u8] {
        &self.data
    }

    /// Consumes the image, returning its bytes.
    pub fn into_raw(self) -> Vec<u8> {
        self.data
    }

    /// The pixel at column `x`, row `y`, or `None` outside the image.
    pub fn get_pixel(&self, x: usize, y: usize) -> Option<[u8; 3]> {
        if x >= self.width || y >= self.height {
            return None;
        }
        let i = (y * self.width + x) * 3;
        Some([self.data[i], self.data[i + 1], self.data[i + 2]])
    }
}

/// What to do with transparency when converting to RGB.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AlphaMode {
    /// PIL's `convert("RGB")`: the alpha channel is discarded (transformers' `load_image`).
    #[default]
    Drop,
    /// Composite onto an opaque white background with PIL's `alpha_composite` (transformers 5's
    /// `convert_to_rgb` for PIL images with transparency).
    CompositeOnWhite,
}

/// Options for [`load_image_with`] and [`decode_image`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoadOptions {
    /// Transparency handling.
    pub alpha: AlphaMode,
    /// Rotate/flip according to the EXIF orientation tag, as `ImageOps.exif_transpose` does.
    pub apply_exif_orientation: bool,
}

impl Default for LoadOptions {
    /// transformers' `load_image`: EXIF orientation applied, alpha dropped.
    fn default() -> Self {
        LoadOptions {
            alpha: AlphaMode::Drop,
            apply_exif_orientation: true,
        }
    }
}

/// Loads an image file as RGB with the default [`LoadOptions`] (transformers' `load_image`).
pub fn load_image(path: &Path) -> Result<RgbImage> {
    load_image_with(path, &LoadOptions::default())
}

/// Loads an image file as RGB. The format is detected from the content.
pub fn load_image_with(path: &Path, options: &LoadOptions) -> Result<RgbImage> {
    let bytes = std::fs::read(path).map_err(|e| CoreError::io(path, e))?;
    decode_with_label(&bytes, options, path)
}

/// Decodes an in-memory encoded image (PNG, JPEG, WebP, BMP, GIF) as RGB. Errors name the
/// image `<memory>`.
pub fn decode_image(bytes: &[u8], options: &LoadOptions) -> Result<RgbImage> {
    decode_with_label(bytes, options, Path::new("<memory>"))
}

fn decode_with_label(bytes: &[u8], options: &LoadOptions, label: &Path) -> Result<RgbImage> {
    let err = |message: String| CoreError::Image {
        path: label.to_path_buf(),
        message,
    };
    let reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| err(format!("not a decodable image ({e})")))?;
    if reader.format().is_none() {
        return Err(err(
            "not a decodable image (unrecognised format; PNG, JPEG, WebP, BMP and GIF are supported)"
                .into(),
        ));
    }
    let mut decoder = reader
        .into_decoder()
        .map_err(|e| err(format!("not a decodable image ({e})")))?;
    let orientation = decoder.orientation().unwrap_or(Orientation::NoTransforms);
    let mut img = DynamicImage::from_decoder(decoder)
        .map_err(|e| err(format!("not a decodable image ({e})")))?;
    if options.apply_exif_orientation {
        img.apply_orientation(orientation);
    }
    if img.width() == 0 || img.height() == 0 {
        return Err(err("image has no pixels".into()));
    }
    Ok(to_rgb(img, options.alpha))
}

/// Converts a decoded image to RGB following PIL's mode conversions.
fn to_rgb(img: DynamicImage, alpha: AlphaMode) -> RgbImage {
    let (w, h) = (img.width() as usize, img.height() as usize);
    // RGBA view with PIL's 8-bit semantics (16-bit samples keep their high byte, as PIL's
    // "RGB;16B"/"LA;16B" unpackers do), plus whether there was an alpha channel.
    let (rgba, has_alpha): (Vec<[u8; 4]>, bool) = match img {
        DynamicImage::ImageRgb8(b) => {
            let data = b.into_raw();
            return RgbImage {
                width: w,
                height: h,
                data,
            };
        }
        DynamicImage::ImageLuma8(b) => {
            let data = b.into_raw().iter().flat_map(|&l| [l, l, l]).collect();
            return RgbImage {
                width: w,
                height: h,
                data,
            };
        }
        DynamicImage::ImageRgba8(b) => (
            b.into_raw()
                .chunks_exact(4)
                .map(|p| [p[0], p[1], p[2], p[3]])
                .collect(),
            true,
        ),
        DynamicImage::ImageLumaA8(b) => (
            b.into_raw()
                .chunks_exact(2)
                .map(|p| [p[0], p[0], p[0], p[1]])
                .collect(),
            true,
        ),
        DynamicImage::ImageRgb16(b) => (
            b.into_raw()
                .chunks_exact(3)
                .map(|p| [hi(p[0]), hi(p[1]), hi(p[2]), 255])
                .collect(),
            false,
        ),
        DynamicImage::ImageRgba16(b) => (
            b.into_raw()
                .chunks_exact(4)
                .map(|p| [hi(p[0]), hi(p[1]), hi(p[2]), hi(p[3])])
                .collect(),
            true,
        ),
        DynamicImage::ImageLumaA16(b) => (
            b.into_raw()
                .chunks_exact(2)
                .map(|p| [hi(p[0]), hi(p[0]), hi(p[0]), hi(p[1])])
                .collect(),
            true,
        ),
        DynamicImage::ImageLuma16(b) => (
            // PIL opens 16-bit grey as mode "I;16"; its conversion to RGB clips to 255.
            b.into_raw()
                .iter()
                .map(|&v| {
                    let l = v.min(255) as u8;
                    [l, l, l, 255]
                })
                .collect(),
            false,
        ),
        other => {
            let has_alpha = other.color().has_alpha();
            (
                other
                    .to_rgba8()
                    .into_raw()
                    .chunks_exact(4)
                    .map(|p| [p[0], p[1], p[2], p[3]])
                    .collect(),
                has_alpha,
            )
        }
    };
    let composite = has_alpha && alpha == AlphaMode::CompositeOnWhite;
    let mut data = Vec::with_capacity(w * h * 3);
    for p in rgba {
        if composite {
            data.extend_from_slice(&composite_on_white(p));
        } else {
            data.extend_from_slice(&p[..3]);
        }
    }
    RgbImage {
        width: w,
        height: h,
        data,
    }
}

fn hi(v: u16) -> u8 {
    (v >> 8) as u8
}

/// PIL's `alpha_composite(white, src)` for one pixel (integer arithmetic of
/// `AlphaComposite.c`, 7 extra bits of precision, rounded division by 255).
fn composite_on_white(p: [u8; 4]) -> [u8; 3] {
    let a = u32::from(p[3]);
    if a == 0 {
        return [255, 255, 255];
    }
    const PREC: u32 = 7;
    let blend = 255 * (255 - a);
    let outa255 = a * 255 + blend;
    let coef1 = a * 255 * 255 * (1 << PREC) / outa255;
    let coef2 = 255 * (1 << PREC) - coef1;
    let mut out = [0u8; 3];
    for c in 0..3 {
        let tmp = u32::from(p[c]) * coef1 + 255 * coef2 + (0x80 << PREC);
        out[c] = ((((tmp >> 8) + tmp) >> 8) >> PREC) as u8;
    }
    out
}

/// A resampling filter (PIL's `resample` codes 2 and 3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resample {
    /// Triangle filter (PIL `BILINEAR` = 2, torchvision `BILINEAR`).
    Bilinear,
    /// Keys cubic, a = -0.5 (PIL `BICUBIC` = 3, torchvision `BICUBIC` with antialias).
    Bicubic,
}

impl Resample {
    /// Maps PIL's integer code (as stored in `preprocessor_config.json`).
    pub fn from_pil_code(code: i64) -> Option<Self> {
        match code {
            2 => Some(Resample::Bilinear),
            3 => Some(Resample::Bicubic),
            _ => None,
        }
    }

    fn support(self) -> f64 {
        match self {
            Resample::Bilinear => 1.0,
            Resample::Bicubic => 2.0,
        }
    }
}

/// Which transformers implementation to reproduce (see the module documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ProcessorBackend {
    /// torchvision-backed "fast" processors (transformers 5.x default).
    #[default]
    Torchvision,
    /// PIL/NumPy "slow" processors.
    Pil,
}

/// PIL's bicubic kernel, evaluated as `Resample.c` writes it.
fn pil_filter(f: Resample, x: f64) -> f64 {
    let x = x.abs();
    match f {
        Resample::Bilinear => {
            if x < 1.0 {
                1.0 - x
            } else {
                0.0
            }
        }
        Resample::Bicubic => {
            const A: f64 = -0.5;
            if x < 1.0 {
                ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
            } else if x < 2.0 {
                (((x - 5.0) * x + 8.0) * x - 4.0) * A
            } else {
                0.0
            }
        }
    }
}

/// PyTorch's antialiasing kernel (`HelperInterpCubic::aa_filter`, `cubic_convolution1/2`).
fn torch_filter(f: Resample, x: f64) -> f64 {
    let x = x.abs();
    match f {
        Resample::Bilinear => {
            if x < 1.0 {
                1.0 - x
            } else {
                0.0
            }
        }
        Resample::Bicubic => {
            const A: f64 = -0.5;
            if x < 1.0 {
                ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
            } else if x < 2.0 {
                ((A * x - 5.0 * A) * x + 8.0 * A) * x - 4.0 * A
            } else {
                0.0
            }
        }
    }
}

/// Fixed-point coefficients of one resampling pass.
struct Coeffs {
    /// `(first input index, number of taps)` per output index.
    bounds: Vec<(usize, usize)>,
    /// `ksize` weights per output index.
    weights: Vec<i32>,
    ksize: usize,
    precision: u32,
}

fn round_half_away(v: f64) -> i32 {
    // C's `(int)(v < 0 ? v - 0.5 : v + 0.5)` (truncation toward zero after the offset).
    if v < 0.0 {
        (v - 0.5) as i32
    } else {
        (v + 0.5) as i32
    }
}

/// Coefficients for resizing `in_size` samples to `out_size` (antialiased: the kernel is
/// stretched by the downscale factor), as both Pillow and PyTorch compute them.
fn coefficients(
    in_size: usize,
    out_size: usize,
    filter: Resample,
    backend: ProcessorBackend,
) -> Coeffs {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = filter.support() * filterscale;
    let ksize = support.ceil() as usize * 2 + 1;
    let inv = 1.0 / filterscale;
    let mut bounds = Vec::with_capacity(out_size);
    let mut float_w = vec![0.0f64; out_size * ksize];
    let mut w_max = 0.0f64;
    for xx in 0..out_size {
        let center = (xx as f64 + 0.5) * scale;
        let xmin = ((center - support + 0.5) as i64).max(0);
        let xmax = ((center + support + 0.5) as i64).min(in_size as i64);
        let count = (xmax - xmin).clamp(0, ksize as i64) as usize;
        let xmin = xmin as usize;
        let k = &mut float_w[xx * ksize..(xx + 1) * ksize];
        let mut total = 0.0;
        for (x, slot) in k.iter_mut().enumerate().take(count) {
            let arg = ((x + xmin) as f64 - center + 0.5) * inv;
            let w = match backend {
                ProcessorBackend::Pil => pil_filter(filter, arg),
                ProcessorBackend::Torchvision => torch_filter(filter, arg),
            };
            *slot = w;
            total += w;
        }
        if total != 0.0 {
            for slot in k.iter_mut().take(count) {
                *slot /= total;
                w_max = w_max.max(*slot);
            }
        }
        bounds.push((xmin, count));
    }
    let precision = match backend {
        // Resample.c: PRECISION_BITS = 32 - 8 - 2.
        ProcessorBackend::Pil => 22,
        // UpSampleKernel.cpp `_compute_index_ranges_int16_weights`.
        ProcessorBackend::Torchvision => {
            let mut p = 0u32;
            while p < 22 {
                let next = (0.5 + w_max * f64::from(1u32 << (p + 1))) as i64;
                if next >= 1 << 15 {
                    break;
                }
                p += 1;
            }
            p
        }
    };
    let factor = f64::from(1u32 << precision);
    let weights = float_w
        .iter()
        .map(|&w| round_half_away(w * factor))
        .collect();
    Coeffs {
        bounds,
        weights,
        ksize,
        precision,
    }
}

/// One separable pass over interleaved RGB rows. `horizontal` resamples along x.
fn resample_pass(
    src: &RgbImage,
    out_w: usize,
    out_h: usize,
    c: &Coeffs,
    horizontal: bool,
) -> RgbImage {
    let mut out = vec![0u8; out_w * out_h * 3];
    let half = 1i64 << (c.precision.max(1) - 1);
    let half = if c.precision == 0 { 0 } else { half };
    let row = src.width * 3;
    for y in 0..out_h {
        for x in 0..out_w {
            let idx = if horizontal { x } else { y };
            let (start, count) = c.bounds[idx];
            let k = &c.weights[idx * c.ksize..idx * c.ksize + count];
            let mut acc = [half; 3];
            for (t, &w) in k.iter().enumerate() {
                let base = if horizontal {
                    y * row + (start + t) * 3
                } else {
                    (start + t) * row + x * 3
                };
                for (a, &v) in acc.iter_mut().zip(&src.data[base..base + 3]) {
                    *a += i64::from(v) * i64::from(w);
                }
            }
            let o = (y * out_w + x) * 3;
            for (dst, a) in out[o..o + 3].iter_mut().zip(acc) {
                *dst = (a >> c.precision).clamp(0, 255) as u8;
            }
        }
    }
    RgbImage {
        width: out_w,
        height: out_h,
        data: out,
    }
}

/// Resizes an RGB image to `width` x `height` as the chosen backend does: two separable passes,
/// each skipped when that dimension is unchanged. PyTorch always runs the horizontal pass first;
/// Pillow 13 runs the vertical pass first when the height shrinks by more than twice as many
/// pixels as the width (`in_h - out_h > 2 * (in_w - out_w)`), horizontal first otherwise
/// (Pillow 12 and older: always horizontal first; results can differ by a level or two).
pub fn resize(
    img: &RgbImage,
    width: usize,
    height: usize,
    filter: Resample,
    backend: ProcessorBackend,
) -> Result<RgbImage> {
    if width == 0 || height == 0 || img.width == 0 || img.height == 0 {
        return Err(CoreError::InvalidInput(format!(
            "cannot resize a {}x{} image to {width}x{height}",
            img.width, img.height
        )));
    }
    let dh = img.height as i64 - height as i64;
    let dw = img.width as i64 - width as i64;
    let vertical_first = backend == ProcessorBackend::Pil && dh > 0 && dh > 2 * dw;
    let horizontal = |cur: &RgbImage| {
        let c = coefficients(img.width, width, filter, backend);
        resample_pass(cur, width, cur.height, &c, true)
    };
    let vertical = |cur: &RgbImage| {
        let c = coefficients(img.height, height, filter, backend);
        resample_pass(cur, cur.width, height, &c, false)
    };
    let mut cur = img.clone();
    if vertical_first {
        if height != img.height {
            cur = vertical(&cur);
        }
        if width != img.width {
            cur = horizontal(&cur);
        }
    } else {
        if width != img.width {
            cur = horizontal(&cur);
        }
        if height != img.height {
            cur = vertical(&cur);
        }
    }
    Ok(cur)
}

/// transformers' `get_resize_output_image_size(size=shortest_edge, default_to_square=False)`:
/// the short side becomes `shortest_edge`, the long side `int(shortest_edge * long / short)`.
/// Returns `(height, width)`.
pub fn shortest_edge_output_size(
    height: usize,
    width: usize,
    shortest_edge: usize,
) -> (usize, usize) {
    let (short, long) = if width <= height {
        (width, height)
    } else {
        (height, width)
    };
    if short == 0 {
        return (height, width);
    }
    let new_long = ((shortest_edge as u128 * long as u128) as f64 / short as f64) as usize;
    if width <= height {
        (new_long, shortest_edge)
    } else {
        (shortest_edge, new_long)
    }
}

/// Pads to a square of side `max(h, w)` filled with `color`, the image centred with
/// `(side - dim) // 2` pixels before it (LLaVA's `expand2square`, transformers'
/// `LlavaImageProcessor.pad_to_square`).
pub fn pad_to_square(img: &RgbImage, color: [u8; 3]) -> RgbImage {
    if img.width == img.height {
        return img.clone();
    }
    let side = img.width.max(img.height);
    let mut out = RgbImage::filled(side, side, color);
    let left = (side - img.width) / 2;
    let top = (side - img.height) / 2;
    let row = img.width * 3;
    for y in 0..img.height {
        let dst = ((top + y) * side + left) * 3;
        out.data[dst..dst + row].copy_from_slice(&img.data[y * row..(y + 1) * row]);
    }
    out
}

/// Centre crop to `crop_h` x `crop_w`, padding with zeros where the image is smaller, as the
/// chosen backend does (see the module documentation for how the two place the padding).
pub fn center_crop(
    img: &RgbImage,
    crop_h: usize,
    crop_w: usize,
    backend: ProcessorBackend,
) -> RgbImage {
    let (h, w) = (img.height as i64, img.width as i64);
    let (ch, cw) = (crop_h as i64, crop_w as i64);
    // Offset of the crop window in image coordinates (may be negative = padding).
    let offset = |dim: i64, crop: i64| -> i64 {
        if crop <= dim {
            // Both: floor((dim - crop) / 2).
            (dim - crop) / 2
        } else {
            match backend {
                // torchvision path: pad (crop - dim) // 2 before, then crop at 0.
                ProcessorBackend::Torchvision => -((crop - dim) / 2),
                // numpy path: pad ceil((crop - dim) / 2) before.
                ProcessorBackend::Pil => -((crop - dim + 1) / 2),
            }
        }
    };
    let top = offset(h, ch);
    let left = offset(w, cw);
    let mut out = vec![0u8; crop_h * crop_w * 3];
    for y in 0..ch {
        let sy = y + top;
        if sy < 0 || sy >= h {
            continue;
        }
        for x in 0..cw {
            let sx = x + left;
            if sx < 0 || sx >= w {
                continue;
            }
            let s = ((sy * w + sx) * 3) as usize;
            let d = ((y * cw + x) * 3) as usize;
            out[d..d + 3].copy_from_slice(&img.data[s..s + 3]);
        }
    }
    RgbImage {
        width: crop_w,
        height: crop_h,
        data: out,
    }
}

/// Preprocessed pixels: `channels x height x width`, channel-major (CHW), `f32`.
#[derive(Debug, Clone, PartialEq)]
pub struct PixelValues {
    /// The values, `channels * height * width` of them.
    pub data: Vec<f32>,
    /// Number of channels (3).
    pub channels: usize,
    /// Height in pixels.
    pub height: usize,
    /// Width in pixels.
    pub width: usize,
}

/// The target size of the resize step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResizeTarget {
    /// `{"shortest_edge": n}` (or a bare integer): keep the aspect ratio.
    ShortestEdge(usize),
    /// `{"height": h, "width": w}`: exact size.
    Exact {
        /// Output height.
        height: usize,
        /// Output width.
        width: usize,
    },
}

/// The settings of a CLIP-style image processor (`CLIPImageProcessor`, `LlavaImageProcessor`,
/// `SiglipImageProcessor`, ...), as read from `preprocessor_config.json` or the
/// `image_processor` section of `processor_config.json`. Unknown fields are ignored.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageProcessorConfig {
    /// Resize before cropping.
    pub do_resize: bool,
    /// Resize target.
    pub size: ResizeTarget,
    /// Resampling filter.
    pub resample: Resample,
    /// Centre crop after resizing.
    pub do_center_crop: bool,
    /// Crop size `(height, width)`.
    pub crop_size: (usize, usize),
    /// Multiply by `rescale_factor`.
    pub do_rescale: bool,
    /// Usually `1/255`.
    pub rescale_factor: f64,
    /// Subtract mean and divide by std.
    pub do_normalize: bool,
    /// Per-channel mean (in the rescaled range).
    pub image_mean: [f32; 3],
    /// Per-channel standard deviation (in the rescaled range).
    pub image_std: [f32; 3],
    /// Convert to RGB (always done by [`load_image`]; kept for completeness).
    pub do_convert_rgb: bool,
    /// LLaVA's pad-to-square with the mean colour (`image_aspect_ratio: "pad"`, or `do_pad`
    /// for `LlavaImageProcessor`).
    pub pad_to_square: bool,
    /// `image_processor_type` as written in the file, if any.
    pub image_processor_type: Option<String>,
}

/// OpenAI CLIP's normalisation mean (the Python floats, rounded to `f32` as `torch.tensor`
/// and NumPy `float32` round them).
pub const OPENAI_CLIP_MEAN: [f32; 3] = [
    0.481_454_66_f64 as f32,
    0.457_827_5_f64 as f32,
    0.408_210_73_f64 as f32,
];
/// OpenAI CLIP's normalisation standard deviation (rounded like [`OPENAI_CLIP_MEAN`]).
pub const OPENAI_CLIP_STD: [f32; 3] = [
    0.268_629_54_f64 as f32,
    0.261_302_58_f64 as f32,
    0.275_777_11_f64 as f32,
];

impl Default for ImageProcessorConfig {
    /// `CLIPImageProcessor`'s class defaults.
    fn default() -> Self {
        ImageProcessorConfig {
            do_resize: true,
            size: ResizeTarget::ShortestEdge(224),
            resample: Resample::Bicubic,
            do_center_crop: true,
            crop_size: (224, 224),
            do_rescale: true,
            rescale_factor: 1.0 / 255.0,
            do_normalize: true,
            image_mean: OPENAI_CLIP_MEAN,
            image_std: OPENAI_CLIP_STD,
            do_convert_rgb: true,
            pad_to_square: false,
            image_processor_type: None,
        }
    }
}

struct FieldReader<'a> {
    obj: &'a serde_json::Map<String, Value>,
    path: &'a Path,
    prefix: &'a str,
}

impl FieldReader<'_> {
    fn name(&self, field: &str) -> String {
        format!("{}{field}", self.prefix)
    }

    fn get(&self, field: &str) -> Option<&Value> {
        self.obj.get(field).filter(|v| !v.is_null())
    }

    fn err(&self, field: &str, message: impl Into<String>) -> CoreError {
        CoreError::invalid_field(self.path, self.name(field), message)
    }

    fn bool(&self, field: &str) -> Result<Option<bool>> {
        match self.get(field) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(v) => Err(self.err(field, format!("expected a boolean, got {v}"))),
        }
    }

    fn f64(&self, field: &str) -> Result<Option<f64>> {
        match self.get(field) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| self.err(field, format!("expected a number, got {v}"))),
        }
    }

    fn positive(&self, v: &Value, field: &str) -> Result<usize> {
        v.as_u64()
            .filter(|&n| n > 0)
            .and_then(|n| usize::try_from(n).ok())
            .ok_or_else(|| self.err(field, format!("expected a positive integer, got {v}")))
    }

    fn triple(&self, field: &str) -> Result<Option<[f32; 3]>> {
        match self.get(field) {
            None => Ok(None),
            Some(Value::Number(n)) => {
                let x = n.as_f64().unwrap_or(0.0) as f32;
                Ok(Some([x, x, x]))
            }
            Some(Value::Array(items)) if items.len() == 3 => {
                let mut out = [0f32; 3];
                for (i, item) in items.iter().enumerate() {
                    out[i] = item
                        .as_f64()
                        .ok_or_else(|| self.err(field, format!("expected numbers, got {item}")))?
                        as f32;
                }
                Ok(Some(out))
            }
            Some(v) => Err(self.err(
                field,
                format!("expected a number or a list of 3 numbers, got {v}"),
            )),
        }
    }
}

impl ImageProcessorConfig {
    /// Reads the image-processor settings of the checkpoint in `dir`, with transformers'
    /// priority: the `image_processor` object of `processor_config.json` if present, else
    /// `preprocessor_config.json`. Missing fields take `CLIPImageProcessor`'s defaults
    /// (SigLIP's for `SiglipImageProcessor`).
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let proc_path = dir.join("processor_config.json");
        if let Some(v) = read_json_opt(&proc_path)? {
            if let Some(nested) = v.get("image_processor") {
                return Self::from_json(nested, &proc_path, "image_processor.");
            }
        }
        let pre_path = dir.join("preprocessor_config.json");
        match read_json_opt(&pre_path)? {
            Some(v) => Self::from_json(&v, &pre_path, ""),
            None => Err(CoreError::io(
                pre_path,
                std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "no such file (and no `image_processor` in processor_config.json)",
                ),
            )),
        }
    }

    /// Parses a config object. `path` and `prefix` (e.g. `"image_processor."`) are used in error
    /// messages.
    pub fn from_json(value: &Value, path: &Path, prefix: &str) -> Result<Self> {
        let Value::Object(obj) = value else {
            return Err(CoreError::invalid_field(
                path,
                prefix.trim_end_matches('.').to_string(),
                "expected a JSON object",
            ));
        };
        let r = FieldReader { obj, path, prefix };
        let ty = r
            .get("image_processor_type")
            .and_then(Value::as_str)
            .map(str::to_string);
        let is_siglip = ty.as_deref().is_some_and(|t| t.starts_with("Siglip"));
        let is_llava = ty
            .as_deref()
            .is_some_and(|t| t.starts_with("LlavaImageProcessor"));
        let mut cfg = ImageProcessorConfig::default();
        if is_siglip {
            cfg.size = ResizeTarget::Exact {
                height: 224,
                width: 224,
            };
            cfg.do_center_crop = false;
            cfg.image_mean = [0.5; 3];
            cfg.image_std = [0.5; 3];
        }
        cfg.image_processor_type = ty;

        if let Some(b) = r.bool("do_resize")? {
            cfg.do_resize = b;
        }
        if let Some(v) = r.get("size") {
            cfg.size = match v {
                Value::Number(_) => ResizeTarget::ShortestEdge(r.positive(v, "size")?),
                Value::Object(m) => {
                    let get = |k: &str| m.get(k).filter(|v| !v.is_null());
                    match (get("shortest_edge"), get("height"), get("width"), get("longest_edge")) {
                        (Some(se), None, None, None) => {
                            ResizeTarget::ShortestEdge(r.positive(se, "size.shortest_edge")?)
                        }
                        (None, Some(h), Some(w), _) => ResizeTarget::Exact {
                            height: r.positive(h, "size.height")?,
                            width: r.positive(w, "size.width")?,
                        },
                        _ => {
                            return Err(r.err(
                                "size",
                                format!("unsupported size {v}: expected {{\"shortest_edge\": n}} or {{\"height\": h, \"width\": w}}"),
                            ))
                        }
                    }
                }
                other => {
                    return Err(r.err(
                        "size",
                        format!("expected an integer or an object, got {other}"),
                    ))
                }
            };
        }
        if let Some(v) = r.get("resample") {
            let code = v
                .as_i64()
                .ok_or_else(|| r.err("resample", format!("expected an integer, got {v}")))?;
            cfg.resample = Resample::from_pil_code(code).ok_or_else(|| {
                r.err(
                    "resample",
                    format!("unsupported filter {code} (supported: 2 = bilinear, 3 = bicubic)"),
                )
            })?;
        }
        if let Some(b) = r.bool("do_center_crop")? {
            cfg.do_center_crop = b;
        }
        if let Some(v) = r.get("crop_size") {
            cfg.crop_size = match v {
                Value::Number(_) => {
                    let n = r.positive(v, "crop_size")?;
                    (n, n)
                }
                Value::Object(m) => {
                    let h = m.get("height").ok_or_else(|| CoreError::MissingField {
                        path: path.to_path_buf(),
                        field: r.name("crop_size.height"),
                    })?;
                    let w = m.get("width").ok_or_else(|| CoreError::MissingField {
                        path: path.to_path_buf(),
                        field: r.name("crop_size.width"),
                    })?;
                    (
                        r.positive(h, "crop_size.height")?,
                        r.positive(w, "crop_size.width")?,
                    )
                }
                other => {
                    return Err(r.err(
                        "crop_size",
                        format!("expected an integer or an object, got {other}"),
                    ))
                }
            };
        }
        if let Some(b) = r.bool("do_rescale")? {
            cfg.do_rescale = b;
        }
        if let Some(x) = r.f64("rescale_factor")? {
            if x == 0.0 || !x.is_finite() {
                return Err(r.err("rescale_factor", "must be a finite, non-zero number"));
            }
            cfg.rescale_factor = x;
        }
        if let Some(b) = r.bool("do_normalize")? {
            cfg.do_normalize = b;
        }
        if let Some(m) = r.triple("image_mean")? {
            cfg.image_mean = m;
        }
        if let Some(s) = r.triple("image_std")? {
            if s.contains(&0.0) {
                return Err(r.err("image_std", "must not contain 0"));
            }
            cfg.image_std = s;
        }
        if let Some(b) = r.bool("do_convert_rgb")? {
            cfg.do_convert_rgb = b;
        }
        let aspect_pad = match r.get("image_aspect_ratio") {
            None => false,
            Some(Value::String(s)) => s == "pad",
            Some(v) => {
                return Err(r.err("image_aspect_ratio", format!("expected a string, got {v}")))
            }
        };
        let do_pad = r.bool("do_pad")?.unwrap_or(false);
        cfg.pad_to_square = aspect_pad || (is_llava && do_pad);
        Ok(cfg)
    }
}

/// A CLIP-style image processor (see the module documentation for the exact pipeline).
#[derive(Debug, Clone, PartialEq)]
pub struct ClipImageProcessor {
    config: ImageProcessorConfig,
    backend: ProcessorBackend,
}

impl ClipImageProcessor {
    /// A processor with the given settings and the default (torchvision) backend.
    pub fn new(config: ImageProcessorConfig) -> Self {
        ClipImageProcessor {
            config,
            backend: ProcessorBackend::default(),
        }
    }

    /// Loads the settings with [`ImageProcessorConfig::from_dir`].
    pub fn from_dir(dir: &Path) -> Result<Self> {
        Ok(Self::new(ImageProcessorConfig::from_dir(dir)?))
    }

    /// Selects which transformers implementation to reproduce.
    pub fn with_backend(mut self, backend: ProcessorBackend) -> Self {
        self.backend = backend;
        self
    }

    /// The settings.
    pub fn config(&self) -> &ImageProcessorConfig {
        &self.config
    }

    /// The backend being reproduced.
    pub fn backend(&self) -> ProcessorBackend {
        self.backend
    }

    /// The `(height, width)` of the pixel values produced for an image of `height` x `width`.
    pub fn output_size(&self, height: usize, width: usize) -> (usize, usize) {
        let c = &self.config;
        let (mut h, mut w) = (height, width);
        if c.pad_to_square {
            let side = h.max(w);
            h = side;
            w = side;
        }
        if c.do_resize {
            (h, w) = match c.size {
                ResizeTarget::ShortestEdge(se) => shortest_edge_output_size(h, w, se),
                ResizeTarget::Exact { height, width } => (height, width),
            };
        }
        if c.do_center_crop {
            (h, w) = c.crop_size;
        }
        (h, w)
    }

    /// The 8-bit image after padding, resizing and cropping (before rescale/normalise).
    pub fn prepare(&self, img: &RgbImage) -> Result<RgbImage> {
        let c = &self.config;
        if img.width == 0 || img.height == 0 {
            return Err(CoreError::InvalidInput(
                "cannot preprocess an empty image".into(),
            ));
        }
        let mut cur = img.clone();
        if c.pad_to_square {
            let color = c.image_mean.map(|m| (f64::from(m) * 255.0) as i64 as u8);
            cur = pad_to_square(&cur, color);
        }
        if c.do_resize {
            let (h, w) = match c.size {
                ResizeTarget::ShortestEdge(se) => {
                    shortest_edge_output_size(cur.height, cur.width, se)
                }
                ResizeTarget::Exact { height, width } => (height, width),
            };
            cur = resize(&cur, w, h, c.resample, self.backend)?;
        }
        if c.do_center_crop {
            cur = center_crop(&cur, c.crop_size.0, c.crop_size.1, self.backend);
        }
        Ok(cur)
    }

    /// Full preprocessing: [`ClipImageProcessor::prepare`], then rescale and normalise into CHW
    /// `f32` values.
    pub fn preprocess(&self, img: &RgbImage) -> Result<PixelValues> {
        let cur = self.prepare(img)?;
        Ok(self.normalize(&cur))
    }

    /// Rescale + normalise an already prepared image (CHW output).
    pub fn normalize(&self, img: &RgbImage) -> PixelValues {
        let c = &self.config;
        let (h, w) = (img.height, img.width);
        let plane = h * w;
        let mut data = vec![0f32; 3 * plane];
        // Per-channel affine map from the 8-bit value, exactly as each backend computes it.
        let mut table = [[0f32; 256]; 3];
        for (ch, t) in table.iter_mut().enumerate() {
            for (v, slot) in t.iter_mut().enumerate() {
                *slot = pixel_value(v as u8, ch, c, self.backend);
            }
        }
        for i in 0..plane {
            for ch in 0..3 {
                data[ch * plane + i] = table[ch][img.data[i * 3 + ch] as usize];
            }
        }
        PixelValues {
            data,
            channels: 3,
            height: h,
            width: w,
        }
    }
}

/// The float value of one 8-bit sample after rescale/normalise.
fn pixel_value(v: u8, ch: usize, c: &ImageProcessorConfig, backend: ProcessorBackend) -> f32 {
    let mean = c.image_mean[ch];
    let std = c.image_std[ch];
    match backend {
        ProcessorBackend::Torchvision => {
            if c.do_rescale && c.do_normalize {
                // torch.tensor(mean) (f32) * (1.0 / rescale_factor): a Python float applied to
                // an f32 tensor is cast to f32 first.
                let inv = (1.0 / c.rescale_factor) as f32;
                (f32::from(v) - mean * inv) / (std * inv)
            } else if c.do_normalize {
                (f32::from(v) - mean) / std
            } else if c.do_rescale {
                // uint8 tensor * Python float -> f32 tensor; the scalar is cast to f32.
                f32::from(v) * (c.rescale_factor as f32)
            } else {
                f32::from(v)
            }
        }
        ProcessorBackend::Pil => {
            let x = if c.do_rescale {
                (f64::from(v) * c.rescale_factor) as f32
            } else {
                f32::from(v)
            };
            if c.do_normalize {
                (x - mean) / std
            } else {
                x
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gradient(w: usize, h: usize) -> RgbImage {
        let mut data = Vec::new();
        for y in 0..h {
            for x in 0..w {
                data.extend_from_slice(&[
                    (x * 255 / w.max(1)) as u8,
                    (y * 255 / h.max(1)) as u8,
                    ((x * 7 + y * 13) % 256) as u8,
                ]);
            }
        }
        RgbImage::from_raw(w, h, data).unwrap()
    }

    #[test]
    fn shortest_edge_rule_matches_hf() {
        // int(224 * 640 / 480) = 298
        assert_eq!(shortest_edge_output_size(480, 640, 224), (224, 298));
        assert_eq!(shortest_edge_output_size(640, 480, 224), (298, 224));
        assert_eq!(shortest_edge_output_size(100, 100, 30), (30, 30));
        // int(30 * 47 / 31) = int(45.48..) = 45
        assert_eq!(shortest_edge_output_size(31, 47, 30), (30, 45));
    }

    #[test]
    fn resize_to_same_size_is_identity_and_constant_stays_constant() {
        let img = gradient(17, 11);
        for backend in [ProcessorBackend::Pil, ProcessorBackend::Torchvision] {
            assert_eq!(
                resize(&img, 17, 11, Resample::Bicubic, backend).unwrap(),
                img
            );
            let flat = RgbImage::filled(37, 23, [200, 3, 128]);
            for (w, h) in [(10, 7), (80, 50), (37, 5), (3, 23)] {
                for f in [Resample::Bicubic, Resample::Bilinear] {
                    let out = resize(&flat, w, h, f, backend).unwrap();
                    assert_eq!(
                        out,
                        RgbImage::filled(w, h, [200, 3, 128]),
                        "{w}x{h} {f:?} {backend:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn pil_coefficients_use_22_bits_and_torch_int16() {
        let c = coefficients(100, 30, Resample::Bicubic, ProcessorBackend::Pil);
        assert_eq!(c.precision, 22);
        // Support 2 * 100/30 = 6.67 -> ksize = 7 * 2 + 1.
        assert_eq!(c.ksize, 15);
        for (i, (_, n)) in c.bounds.iter().enumerate() {
            let sum: i64 = c.weights[i * c.ksize..i * c.ksize + n]
                .iter()
                .map(|&w| i64::from(w))
                .sum();
            assert!((sum - (1 << 22)).abs() <= 8, "row {i}: {sum}");
        }
        let t = coefficients(100, 30, Resample::Bicubic, ProcessorBackend::Torchvision);
        assert!(t.weights.iter().all(|&w| w.abs() < 1 << 15));
        assert!(t.precision > 10 && t.precision < 22, "{}", t.precision);
    }

    #[test]
    fn downscale_averages_stripes() {
        // Alternating black/white columns averaged by a 2x downscale give mid grey.
        let mut data = Vec::new();
        for _y in 0..8 {
            for x in 0..16 {
                let v = if x % 2 == 0 { 0 } else { 255 };
                data.extend_from_slice(&[v, v, v]);
            }
        }
        let img = RgbImage::from_raw(16, 8, data).unwrap();
        for backend in [ProcessorBackend::Pil, ProcessorBackend::Torchvision] {
            let out = resize(&img, 8, 8, Resample::Bilinear, backend).unwrap();
            for x in 1..7 {
                let p = out.get_pixel(x, 4).unwrap()[0];
                assert!((126..=129).contains(&p), "{backend:?} x={x}: {p}");
            }
        }
    }

    #[test]
    fn center_crop_offsets_and_padding() {
        let img = gradient(7, 5);
        let c = center_crop(&img, 3, 3, ProcessorBackend::Torchvision);
        // top = (5 - 3) // 2 = 1, left = (7 - 3) // 2 = 2
        assert_eq!(c.get_pixel(0, 0), img.get_pixel(2, 1));
        assert_eq!(c, center_crop(&img, 3, 3, ProcessorBackend::Pil));
        // Crop larger than the image by an odd amount: torchvision pads 1 before, numpy 2.
        let tv = center_crop(&img, 8, 7, ProcessorBackend::Torchvision);
        let np = center_crop(&img, 8, 7, ProcessorBackend::Pil);
        assert_eq!(tv.get_pixel(0, 0), Some([0, 0, 0]));
        assert_eq!(tv.get_pixel(0, 1), img.get_pixel(0, 0));
        assert_eq!(np.get_pixel(0, 1), Some([0, 0, 0]));
        assert_eq!(np.get_pixel(0, 2), img.get_pixel(0, 0));
        assert_eq!(tv.get_pixel(6, 7), Some([0, 0, 0]));
    }

    #[test]
    fn pad_to_square_centres_with_floor() {
        let img = RgbImage::filled(4, 1, [9, 9, 9]);
        let sq = pad_to_square(&img, [1, 2, 3]);
        assert_eq!((sq.width(), sq.height()), (4, 4));
        // (4 - 1) // 2 = 1 row above, 2 below.
        assert_eq!(sq.get_pixel(0, 0), Some([1, 2, 3]));
        assert_eq!(sq.get_pixel(0, 1), Some([9, 9, 9]));
        assert_eq!(sq.get_pixel(0, 2), Some([1, 2, 3]));
    }

    #[test]
    fn normalisation_fused_vs_unfused() {
        let cfg = ImageProcessorConfig::default();
        let fast = ClipImageProcessor::new(cfg.clone());
        let slow = ClipImageProcessor::new(cfg).with_backend(ProcessorBackend::Pil);
        let img = RgbImage::from_raw(1, 1, vec![0, 128, 255]).unwrap();
        let a = fast.normalize(&img);
        let b = slow.normalize(&img);
        let want = [
            (0.0 - 0.48145466) / 0.26862954,
            (128.0 / 255.0 - 0.4578275) / 0.26130258,
            (1.0 - 0.40821073) / 0.27577711,
        ];
        for (ch, w) in want.iter().enumerate() {
            assert!((a.data[ch] - *w as f32).abs() < 1e-5);
            assert!((b.data[ch] - *w as f32).abs() < 1e-5);
        }
        // The fused form is exactly this f32 expression.
        let inv = (1.0f64 / (1.0 / 255.0)) as f32;
        assert_eq!(
            a.data[1],
            (128.0f32 - OPENAI_CLIP_MEAN[1] * inv) / (OPENAI_CLIP_STD[1] * inv)
        );
        assert_eq!(
            b.data[1],
            ((128.0f64 / 255.0) as f32 - OPENAI_CLIP_MEAN[1]) / OPENAI_CLIP_STD[1]
        );
    }

    #[test]
    fn alpha_composite_on_white_matches_pil_formula() {
        assert_eq!(composite_on_white([10, 20, 30, 255]), [10, 20, 30]);
        assert_eq!(composite_on_white([10, 20, 30, 0]), [255, 255, 255]);
        // 0 at half alpha over white: round(255 * 127/255 ... ) as PIL computes it.
        assert_eq!(composite_on_white([0, 0, 0, 128]), [127, 127, 127]);
    }

    #[test]
    fn config_layouts_and_errors() {
        let v = serde_json::json!({
            "crop_size": 336, "do_center_crop": true, "do_normalize": true, "do_resize": true,
            "feature_extractor_type": "CLIPFeatureExtractor",
            "image_mean": [0.48145466, 0.4578275, 0.40821073],
            "image_std": [0.26862954, 0.26130258, 0.27577711],
            "resample": 3, "size": 336, "image_aspect_ratio": "pad", "something_else": [1, 2]
        });
        let c = ImageProcessorConfig::from_json(&v, Path::new("p.json"), "").unwrap();
        assert_eq!(c.size, ResizeTarget::ShortestEdge(336));
        assert_eq!(c.crop_size, (336, 336));
        assert!(c.pad_to_square);

        let v = serde_json::json!({"image_processor_type": "LlavaImageProcessor", "do_pad": true,
            "size": {"height": 30, "width": 40}, "crop_size": {"height": 20, "width": 10}, "resample": 2});
        let c =
            ImageProcessorConfig::from_json(&v, Path::new("p.json"), "image_processor.").unwrap();
        assert!(c.pad_to_square);
        assert_eq!(
            c.size,
            ResizeTarget::Exact {
                height: 30,
                width: 40
            }
        );
        assert_eq!(c.crop_size, (20, 10));
        assert_eq!(c.resample, Resample::Bilinear);
        let p = ClipImageProcessor::new(c);
        assert_eq!(p.output_size(5, 9), (20, 10));

        // do_pad on a CLIP processor means batch padding, not pad-to-square.
        let v = serde_json::json!({"image_processor_type": "CLIPImageProcessor", "do_pad": true});
        assert!(
            !ImageProcessorConfig::from_json(&v, Path::new("p.json"), "")
                .unwrap()
                .pad_to_square
        );

        let v = serde_json::json!({"resample": 1});
        let e = ImageProcessorConfig::from_json(&v, Path::new("p.json"), "image_processor.")
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "p.json: field `image_processor.resample`: unsupported filter 1 (supported: 2 = bilinear, 3 = bicubic)"
        );
        let v = serde_json::json!({"size": {"longest_edge": 3}});
        assert!(ImageProcessorConfig::from_json(&v, Path::new("p.json"), "").is_err());
        let v = serde_json::json!({"crop_size": {"height": 3}});
        let e = ImageProcessorConfig::from_json(&v, Path::new("p.json"), "").unwrap_err();
        assert_eq!(
            e.to_string(),
            "p.json: missing field `crop_size.height`".replace("height", "width")
        );
        let v = serde_json::json!({"image_mean": [0.5, 0.5]});
        assert!(ImageProcessorConfig::from_json(&v, Path::new("p.json"), "").is_err());
        let v = serde_json::json!({"image_std": [0.5, 0.0, 0.5]});
        assert!(ImageProcessorConfig::from_json(&v, Path::new("p.json"), "").is_err());
    }

    #[test]
    fn decode_errors_name_the_source() {
        let e = decode_image(b"definitely not an image", &LoadOptions::default()).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("<memory>: not a decodable image ("),
            "{e}"
        );
        // A PNG signature followed by garbage is detected as PNG but fails to decode.
        let e = decode_image(b"\x89PNG\r\n\x1a\n garbage", &LoadOptions::default()).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("<memory>: not a decodable image ("),
            "{e}"
        );
        let e = load_image(Path::new("/nonexistent/img.png")).unwrap_err();
        assert!(matches!(e, CoreError::Io { .. }));
    }

    fn encode_png(img: DynamicImage) -> Vec<u8> {
        let mut buf = Cursor::new(Vec::new());
        img.write_to(&mut buf, image::ImageFormat::Png).unwrap();
        buf.into_inner()
    }

    #[test]
    fn conversions_follow_pil() {
        // RGBA: alpha dropped by default, composited on request.
        let rgba = image::RgbaImage::from_raw(2, 1, vec![10, 20, 30, 0, 40, 50, 60, 255]).unwrap();
        let png = encode_png(DynamicImage::ImageRgba8(rgba));
        let dropped = decode_image(&png, &LoadOptions::default()).unwrap();
        assert_eq!(dropped.as_raw(), &[10, 20, 30, 40, 50, 60]);
        let opts = LoadOptions {
            alpha: AlphaMode::CompositeOnWhite,
            ..LoadOptions::default()
        };
        assert_eq!(
            decode_image(&png, &opts).unwrap().as_raw(),
            &[255, 255, 255, 40, 50, 60]
        );
        // Grey: replicated.
        let grey = image::GrayImage::from_raw(2, 1, vec![7, 200]).unwrap();
        let png = encode_png(DynamicImage::ImageLuma8(grey));
        assert_eq!(
            decode_image(&png, &LoadOptions::default())
                .unwrap()
                .as_raw(),
            &[7, 7, 7, 200, 200, 200]
        );
        // 16-bit RGB keeps the high byte.
        let rgb16 = image::ImageBuffer::<image::Rgb<u16>, Vec<u16>>::from_raw(
            1,
            1,
            vec![0x12ff, 0xab00, 0xffff],
        )
        .unwrap();
        let png = encode_png(DynamicImage::ImageRgb16(rgb16));
        assert_eq!(
            decode_image(&png, &LoadOptions::default())
                .unwrap()
                .as_raw(),
            &[0x12, 0xab, 0xff]
        );
        // Content decides the format, not a name: a PNG written under a .jpg name loads.
        let dir = std::env::temp_dir().join(format!("resonance-core-img-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("actually_png.jpg");
        std::fs::write(&path, &png).unwrap();
        assert_eq!(load_image(&path).unwrap().as_raw(), &[0x12, 0xab, 0xff]);
        let bad = dir.join("not_an_image.png");
        std::fs::write(&bad, b"hello").unwrap();
        let e = load_image(&bad).unwrap_err();
        assert!(
            e.to_string()
                .starts_with(&format!("{}: not a decodable image (", bad.display())),
            "{e}"
        );
    }
}
