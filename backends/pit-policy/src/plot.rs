//! Draws a lab report as a PNG: ticks counted over time for each policy (with the
//! wall-clock expectation and the stalls shaded), and below it how far each run was behind.

use std::path::Path;

use devshare_common::pit::LostTickPolicy;

use crate::lab::{LabReport, PolicyRun};
use crate::png::IndexedImage;

const WIDTH: i32 = 960;
const HEIGHT: i32 = 680;
const LEFT: i32 = 90;
const RIGHT: i32 = 30;
/// Text is the 5x7 font scaled by this.
const SCALE: i32 = 2;

const WHITE: u8 = 0;
const BLACK: u8 = 1;
const GRID: u8 = 2;
const STALL: u8 = 3;
const BLUE: u8 = 4;
const RED: u8 = 5;
const GREY: u8 = 6;
const PALETTE: [[u8; 3]; 7] = [
    [255, 255, 255],
    [0, 0, 0],
    [225, 225, 225],
    [255, 236, 200],
    [30, 90, 200],
    [210, 40, 40],
    [120, 120, 120],
];

/// Why a plot was not written.
#[derive(Debug, thiserror::Error)]
pub enum PlotError {
    /// The report has no samples to draw.
    #[error("nothing to plot: the report has no samples")]
    Empty,
    /// The file could not be written (or its path is a symlink or not a regular file).
    #[error("cannot write the plot: {0}")]
    Write(#[from] devshare_common::files::FileError),
}

/// Letters whose glyph hangs below the line: drawn this many rows lower.
fn descent(c: char) -> i32 {
    if matches!(c.to_ascii_lowercase(), 'g' | 'p' | 'q' | 'y') {
        2
    } else {
        0
    }
}

/// 5x7 glyphs, one row per byte, bit 4 = leftmost column. Lower case only; upper case is
/// drawn as lower case.
fn glyph(c: char) -> [u8; 7] {
    match c.to_ascii_lowercase() {
        '0' => [0x0E, 0x11, 0x13, 0x15, 0x19, 0x11, 0x0E],
        '1' => [0x04, 0x0C, 0x04, 0x04, 0x04, 0x04, 0x0E],
        '2' => [0x0E, 0x11, 0x01, 0x02, 0x04, 0x08, 0x1F],
        '3' => [0x1F, 0x02, 0x04, 0x02, 0x01, 0x11, 0x0E],
        '4' => [0x02, 0x06, 0x0A, 0x12, 0x1F, 0x02, 0x02],
        '5' => [0x1F, 0x10, 0x1E, 0x01, 0x01, 0x11, 0x0E],
        '6' => [0x06, 0x08, 0x10, 0x1E, 0x11, 0x11, 0x0E],
        '7' => [0x1F, 0x01, 0x02, 0x04, 0x08, 0x08, 0x08],
        '8' => [0x0E, 0x11, 0x11, 0x0E, 0x11, 0x11, 0x0E],
        '9' => [0x0E, 0x11, 0x11, 0x0F, 0x01, 0x02, 0x0C],
        'a' => [0x00, 0x00, 0x0E, 0x01, 0x0F, 0x11, 0x0F],
        'b' => [0x10, 0x10, 0x16, 0x19, 0x11, 0x11, 0x1E],
        'c' => [0x00, 0x00, 0x0E, 0x10, 0x10, 0x11, 0x0E],
        'd' => [0x01, 0x01, 0x0D, 0x13, 0x11, 0x11, 0x0F],
        'e' => [0x00, 0x00, 0x0E, 0x11, 0x1F, 0x10, 0x0E],
        'f' => [0x06, 0x09, 0x08, 0x1C, 0x08, 0x08, 0x08],
        'g' => [0x0F, 0x11, 0x11, 0x13, 0x0D, 0x01, 0x0E],
        'h' => [0x10, 0x10, 0x16, 0x19, 0x11, 0x11, 0x11],
        'i' => [0x04, 0x00, 0x0C, 0x04, 0x04, 0x04, 0x0E],
        'j' => [0x02, 0x00, 0x06, 0x02, 0x02, 0x12, 0x0C],
        'k' => [0x10, 0x10, 0x12, 0x14, 0x18, 0x14, 0x12],
        'l' => [0x0C, 0x04, 0x04, 0x04, 0x04, 0x04, 0x0E],
        'm' => [0x00, 0x00, 0x1A, 0x15, 0x15, 0x11, 0x11],
        'n' => [0x00, 0x00, 0x16, 0x19, 0x11, 0x11, 0x11],
        'o' => [0x00, 0x00, 0x0E, 0x11, 0x11, 0x11, 0x0E],
        'p' => [0x1E, 0x11, 0x11, 0x1E, 0x10, 0x10, 0x10],
        'q' => [0x0F, 0x11, 0x11, 0x0F, 0x01, 0x01, 0x01],
        'r' => [0x00, 0x00, 0x16, 0x19, 0x10, 0x10, 0x10],
        's' => [0x00, 0x00, 0x0E, 0x10, 0x0E, 0x01, 0x1E],
        't' => [0x08, 0x08, 0x1C, 0x08, 0x08, 0x09, 0x06],
        'u' => [0x00, 0x00, 0x11, 0x11, 0x11, 0x13, 0x0D],
        'v' => [0x00, 0x00, 0x11, 0x11, 0x11, 0x0A, 0x04],
        'w' => [0x00, 0x00, 0x11, 0x11, 0x15, 0x15, 0x0A],
        'x' => [0x00, 0x00, 0x11, 0x0A, 0x04, 0x0A, 0x11],
        'y' => [0x11, 0x11, 0x11, 0x0F, 0x01, 0x11, 0x0E],
        'z' => [0x00, 0x00, 0x1F, 0x02, 0x04, 0x08, 0x1F],
        '(' => [0x02, 0x04, 0x08, 0x08, 0x08, 0x04, 0x02],
        ')' => [0x08, 0x04, 0x02, 0x02, 0x02, 0x04, 0x08],
        '.' => [0x00, 0x00, 0x00, 0x00, 0x00, 0x0C, 0x0C],
        ',' => [0x00, 0x00, 0x00, 0x00, 0x0C, 0x04, 0x08],
        ':' => [0x00, 0x0C, 0x0C, 0x00, 0x0C, 0x0C, 0x00],
        '%' => [0x18, 0x19, 0x02, 0x04, 0x08, 0x13, 0x03],
        '-' => [0x00, 0x00, 0x00, 0x1F, 0x00, 0x00, 0x00],
        '+' => [0x00, 0x04, 0x04, 0x1F, 0x04, 0x04, 0x00],
        '/' => [0x00, 0x01, 0x02, 0x04, 0x08, 0x10, 0x00],
        '=' => [0x00, 0x00, 0x1F, 0x00, 0x1F, 0x00, 0x00],
        '_' => [0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x1F],
        _ => [0; 7],
    }
}

struct Canvas {
    pixels: Vec<u8>,
}

impl Canvas {
    fn new() -> Self {
        Canvas {
            pixels: vec![WHITE; (WIDTH * HEIGHT) as usize],
        }
    }

    fn set(&mut self, x: i32, y: i32, colour: u8) {
        if (0..WIDTH).contains(&x) && (0..HEIGHT).contains(&y) {
            self.pixels[(y * WIDTH + x) as usize] = colour;
        }
    }

    fn fill(&mut self, x0: i32, y0: i32, x1: i32, y1: i32, colour: u8) {
        for y in y0.min(y1)..=y0.max(y1) {
            for x in x0.min(x1)..=x0.max(x1) {
                self.set(x, y, colour);
            }
        }
    }

    /// A 2-pixel-wide line (Bresenham, each point drawn as 2x2).
    fn line(&mut self, (mut x0, mut y0): (i32, i32), (x1, y1): (i32, i32), colour: u8) {
        let dx = (x1 - x0).abs();
        let dy = -(y1 - y0).abs();
        let sx = if x0 < x1 { 1 } else { -1 };
        let sy = if y0 < y1 { 1 } else { -1 };
        let mut err = dx + dy;
        loop {
            self.fill(x0, y0, x0 + 1, y0 + 1, colour);
            if x0 == x1 && y0 == y1 {
                break;
            }
            let e2 = 2 * err;
            if e2 >= dy {
                err += dy;
                x0 += sx;
            }
            if e2 <= dx {
                err += dx;
                y0 += sy;
            }
        }
    }

    fn text(&mut self, x: i32, y: i32, text: &str, colour: u8) {
        for (i, c) in text.chars().enumerate() {
            let gx = x + i as i32 * 6 * SCALE;
            for (row, bits) in glyph(c).iter().enumerate() {
                for col in 0..5 {
                    if bits & (0x10 >> col) != 0 {
                        let px = gx + col * SCALE;
                        let py = y + (row as i32 + descent(c)) * SCALE;
                        self.fill(px, py, px + SCALE - 1, py + SCALE - 1, colour);
                    }
                }
            }
        }
    }
}

fn text_width(text: &str) -> i32 {
    text.chars().count() as i32 * 6 * SCALE
}

/// A "nice" tick step (1, 2 or 5 times a power of ten) giving about `target` ticks.
fn tick_step(span: f64, target: f64) -> f64 {
    let raw = (span / target).max(f64::MIN_POSITIVE);
    let magnitude = 10f64.powf(raw.log10().floor());
    let unit = raw / magnitude;
    let nice = if unit <= 1.0 {
        1.0
    } else if unit <= 2.0 {
        2.0
    } else if unit <= 5.0 {
        5.0
    } else {
        10.0
    };
    nice * magnitude
}

fn label(value: f64, step: f64) -> String {
    let decimals = if step >= 1.0 {
        0
    } else {
        (-step.log10().floor()) as usize
    };
    format!("{value:.decimals$}")
}

/// A plot area: pixel box plus data ranges.
struct Panel {
    top: i32,
    bottom: i32,
    t_max: f64,
    y_min: f64,
    y_max: f64,
}

impl Panel {
    fn x(&self, t: f64) -> i32 {
        LEFT + ((t / self.t_max) * f64::from(WIDTH - LEFT - RIGHT)).round() as i32
    }

    fn y(&self, v: f64) -> i32 {
        let frac = (v - self.y_min) / (self.y_max - self.y_min);
        self.bottom - (frac * f64::from(self.bottom - self.top)).round() as i32
    }

    fn frame(&self, c: &mut Canvas, stalls: &[(f64, f64)], y_title: &str, x_labels: bool) {
        for &(s, e) in stalls {
            c.fill(self.x(s), self.top, self.x(e), self.bottom, STALL);
        }
        let t_step = tick_step(self.t_max, 10.0);
        let mut t = 0.0;
        while t <= self.t_max + 1e-9 {
            let x = self.x(t);
            c.fill(x, self.top, x, self.bottom, GRID);
            if x_labels {
                let l = label(t, t_step);
                c.text(x - text_width(&l) / 2, self.bottom + 8, &l, BLACK);
            }
            t += t_step;
        }
        let y_step = tick_step(self.y_max - self.y_min, 5.0);
        let mut v = (self.y_min / y_step).ceil() * y_step;
        while v <= self.y_max + 1e-9 {
            let y = self.y(v);
            c.fill(LEFT, y, WIDTH - RIGHT, y, GRID);
            let l = label(v, y_step);
            c.text(LEFT - 8 - text_width(&l), y - 7, &l, BLACK);
            v += y_step;
        }
        c.fill(LEFT, self.top, LEFT, self.bottom, BLACK);
        c.fill(LEFT, self.bottom, WIDTH - RIGHT, self.bottom, BLACK);
        c.text(LEFT + 8, self.top + 6, y_title, BLACK);
    }

    fn series(&self, c: &mut Canvas, points: impl Iterator<Item = (f64, f64)>, colour: u8) {
        let mut prev: Option<(i32, i32)> = None;
        for (t, v) in points {
            let p = (self.x(t), self.y(v));
            if let Some(q) = prev {
                if q != p {
                    c.line(q, p, colour);
                }
            }
            prev = Some(p);
        }
    }
}

fn colour_of(policy: LostTickPolicy) -> u8 {
    match policy {
        LostTickPolicy::Delay => BLUE,
        LostTickPolicy::Discard => RED,
    }
}

/// Ticks behind the wall clock at each sample (sample times start where the PIT did).
fn behind(run: &PolicyRun, rate: f64) -> impl Iterator<Item = (f64, f64)> + '_ {
    run.samples
        .iter()
        .map(move |s| (s.t, (s.t * rate).floor() - f64::from(s.ticks)))
}

/// Renders `report` as PNG bytes.
pub fn render(report: &LabReport) -> Result<Vec<u8>, PlotError> {
    let t_max = report
        .runs
        .iter()
        .filter_map(|r| r.samples.last())
        .map(|s| s.t)
        .fold(0.0, f64::max);
    if t_max <= 0.0 {
        return Err(PlotError::Empty);
    }
    let rate = report.rate_hz;
    let max_ticks = report
        .runs
        .iter()
        .flat_map(|r| r.samples.iter().map(|s| f64::from(s.ticks)))
        .fold(t_max * rate, f64::max);
    let max_behind = report
        .runs
        .iter()
        .flat_map(|r| behind(r, rate).map(|(_, b)| b))
        .fold(1.0, f64::max);
    let stalls = report
        .runs
        .first()
        .map(|r| r.stall_windows.as_slice())
        .unwrap_or(&[]);

    let mut c = Canvas::new();
    let title = format!(
        "guest pit ticks at {:.0} hz, stalls {}{}",
        rate,
        report.pattern,
        report
            .kvm_module
            .as_deref()
            .map(|m| format!(", {m}"))
            .unwrap_or_default()
    );
    c.text(LEFT, 12, &title, BLACK);

    let ticks = Panel {
        top: 50,
        bottom: 370,
        t_max,
        y_min: 0.0,
        y_max: max_ticks * 1.05,
    };
    ticks.frame(&mut c, stalls, "ticks counted by the guest", false);
    ticks.series(
        &mut c,
        [(0.0, 1.0), (t_max, 1.0 + t_max * rate)].into_iter(),
        GREY,
    );
    for run in &report.runs {
        let points = run.samples.iter().map(|s| (s.t, f64::from(s.ticks)));
        ticks.series(&mut c, points, colour_of(run.policy));
    }

    let lag = Panel {
        top: 400,
        bottom: 620,
        t_max,
        y_min: -1.0,
        y_max: max_behind * 1.1,
    };
    lag.frame(&mut c, stalls, "ticks behind wall clock", true);
    for run in &report.runs {
        lag.series(&mut c, behind(run, rate), colour_of(run.policy));
    }
    let x_title = "time since the pit started (s); shaded: vcpu withheld";
    c.text(
        LEFT + (WIDTH - LEFT - RIGHT - text_width(x_title)) / 2,
        HEIGHT - 30,
        x_title,
        BLACK,
    );

    // Legend, top left of the upper panel, under its title.
    let mut y = ticks.top + 30;
    let mut entries = vec![("expected (wall clock)".to_owned(), GREY)];
    for run in &report.runs {
        entries.push((
            format!(
                "{} (reinject {}): lost {:.2}%",
                run.policy,
                if run.policy.reinject() { "on" } else { "off" },
                run.lost_percent
            ),
            colour_of(run.policy),
        ));
    }
    for (text, colour) in entries {
        c.fill(LEFT + 10, y + 5, LEFT + 40, y + 8, colour);
        c.text(LEFT + 50, y, &text, BLACK);
        y += 22;
    }

    Ok(IndexedImage {
        width: WIDTH as u32,
        height: HEIGHT as u32,
        pixels: c.pixels,
        palette: PALETTE.to_vec(),
    }
    .encode())
}

/// Renders `report` and writes it to `path` as a new 0644 file: never through a symlink and
/// never truncating another file in place (the kernel runs this as root; see
/// [`devshare_common::files::replace_file`]).
pub fn write_png(report: &LabReport, path: &Path) -> Result<(), PlotError> {
    let bytes = render(report)?;
    devshare_common::files::replace_file(path, &bytes, 0o644)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tick_steps_are_round() {
        assert_eq!(tick_step(3.5, 10.0), 0.5);
        assert_eq!(tick_step(3500.0, 5.0), 1000.0);
        assert_eq!(tick_step(60.0, 5.0), 20.0);
        assert_eq!(label(1.5, 0.5), "1.5");
        assert_eq!(label(2000.0, 1000.0), "2000");
    }

    #[test]
    fn empty_report_is_an_error() {
        let report = LabReport {
            rate_hz: 1000.0,
            divisor: 1193,
            pattern: "none".into(),
            duration_s: 0.0,
            settle_s: 0.0,
            kvm_module: None,
            runs: vec![],
        };
        assert!(matches!(render(&report), Err(PlotError::Empty)));
    }

    #[test]
    fn the_plot_is_never_written_through_a_symlink() {
        let report = LabReport {
            rate_hz: 1000.0,
            divisor: 1193,
            pattern: "one".into(),
            duration_s: 1.0,
            settle_s: 0.0,
            kvm_module: None,
            runs: vec![PolicyRun {
                policy: LostTickPolicy::Delay,
                elapsed_s: 1.0,
                measured_at_s: 1.0,
                expected_ticks: 1000,
                counted_ticks: 1000,
                lost_ticks: 0,
                behind_at_end: 0,
                lost_percent: 0.0,
                stalls: 0,
                stalled_s: 0.0,
                max_behind_ticks: 0,
                catch_up_ms: None,
                samples: vec![
                    crate::lab::Sample { t: 0.0, ticks: 0 },
                    crate::lab::Sample {
                        t: 1.0,
                        ticks: 1000,
                    },
                ],
                stall_windows: vec![],
            }],
        };
        let dir = std::env::temp_dir().join(format!("pit-plot-link-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let victim = dir.join("passwd");
        std::fs::write(&victim, b"root:x:0:0").unwrap();
        let link = dir.join("plot.png");
        std::os::unix::fs::symlink(&victim, &link).unwrap();
        let e = write_png(&report, &link).unwrap_err();
        assert!(e.to_string().contains("symlink"), "{e}");
        assert_eq!(std::fs::read(&victim).unwrap(), b"root:x:0:0");
        // A regular file is replaced by the plot.
        let out = dir.join("real.png");
        std::fs::write(&out, b"old").unwrap();
        write_png(&report, &out).unwrap();
        assert!(std::fs::read(&out).unwrap().starts_with(b"\x89PNG"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
