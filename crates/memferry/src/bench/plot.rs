//! The SVG chart of a bench run.
//!
//! One bar per measured row (median GiB/s, a whisker from the slowest to the
//! fastest run), coloured and grouped by operation and page-cache
//! temperature, the best row of each group starred, and the limits measured
//! in the same run drawn as dashed horizontal lines labelled with their name
//! and value. Text is written as SVG `<text>`, so no font files are needed.

use std::ffi::OsString;
use std::fmt::Display;
use std::path::Path;

use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use super::{BenchReport, Limit, Row};
use crate::{Error, Result};

/// Height of the data area in pixels.
const PLOT_HEIGHT: u32 = 420;
/// Width of one bar's slot in pixels, when the chart is wider than the minimum.
const SLOT_PX: f64 = 56.0;
/// Widest slot when there are few bars.
const MAX_SLOT_PX: f64 = 90.0;
/// Gap between groups, in slots.
const GROUP_GAP: f64 = 0.7;
/// Bar width, in slots.
const BAR_WIDTH: f64 = 0.72;
/// Smallest width of the whole picture.
const MIN_WIDTH: u32 = 960;
/// Space left of the data area for the y labels and the axis name.
const Y_LABEL_AREA: u32 = 72;
/// Outer margin.
const MARGIN: u32 = 20;
/// memcpy is drawn only when within this factor of the fastest bar.
const MEMCPY_RATIO: f64 = 3.0;
/// Room above the tallest whisker or limit.
const HEADROOM: f64 = 1.15;

/// Colours of the usual groups; the limit each group is compared with is
/// drawn in a darker shade of the same hue.
const GROUP_COLORS: [(&str, RGBColor); 3] = [
    ("restore-cold", RGBColor(76, 120, 168)),
    ("restore-warm", RGBColor(245, 133, 24)),
    ("save", RGBColor(84, 162, 75)),
];
/// Colours of any other group, in order of appearance.
const OTHER_COLORS: [RGBColor; 6] = [
    RGBColor(178, 121, 162),
    RGBColor(157, 117, 93),
    RGBColor(228, 87, 86),
    RGBColor(114, 183, 178),
    RGBColor(186, 176, 172),
    RGBColor(238, 202, 59),
];
const ODIRECT_READ_COLOR: RGBColor = RGBColor(24, 54, 96);
const ODIRECT_WRITE_COLOR: RGBColor = RGBColor(30, 95, 30);
const BUFFERED_READ_COLOR: RGBColor = RGBColor(160, 75, 0);
const MEMCPY_COLOR: RGBColor = RGBColor(200, 30, 30);
const STAR_FILL: RGBColor = RGBColor(240, 180, 0);
const STAR_EDGE: RGBColor = RGBColor(110, 70, 0);
const TEXT_GREY: RGBColor = RGBColor(70, 70, 70);

type Area<'a> = DrawingArea<SVGBackend<'a>, Shift>;

/// Writes a chart of GiB/s per backend and setting, with the limits drawn
/// as horizontal lines, to `path` (SVG).
///
/// The file is written under a temporary name in the same directory and then
/// renamed over `path`, so a reader never sees half a chart.
pub fn write_svg(report: &BenchReport, path: &Path) -> Result<()> {
    let svg = render(report)?;
    write_atomically(path, &svg)
}

/// The chart as SVG text.
fn render(report: &BenchReport) -> Result<String> {
    let chart = Chart::new(report);
    let layout = Layout::new(&chart);
    let mut svg = String::new();
    {
        let root =
            SVGBackend::with_string(&mut svg, (layout.width, layout.height)).into_drawing_area();
        root.fill(&WHITE).map_err(draw_err)?;
        draw_header(&root, &chart, &layout)?;
        if chart.bars.is_empty() {
            draw_empty(&root, &layout)?;
        } else {
            draw_plot(&root, &chart, &layout)?;
        }
        root.present().map_err(draw_err)?;
    }
    Ok(svg)
}

fn draw_err(e: impl Display) -> Error {
    Error::InvalidInput(format!("drawing the chart: {e}"))
}

fn write_atomically(path: &Path, contents: &str) -> Result<()> {
    let context = || format!("writing {}", path.display());
    let Some(name) = path.file_name() else {
        return Err(Error::InvalidInput(format!(
            "cannot write the chart to {}: not a file name",
            path.display()
        )));
    };
    let mut tmp_name = OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(".tmp{}", std::process::id()));
    let tmp = path.with_file_name(tmp_name);
    std::fs::write(&tmp, contents).map_err(|e| Error::io(context(), e))?;
    if let Err(e) = std::fs::rename(&tmp, path) {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::io(context(), e));
    }
    Ok(())
}

/// A bar group: one (op, temperature) pair.
struct Group {
    name: String,
    color: RGBColor,
}

/// One measured row.
struct Bar<'a> {
    label: &'a str,
    group: usize,
    /// Centre, in slots.
    x: f64,
    median: f64,
    min: f64,
    max: f64,
    best: bool,
}

/// One limit drawn as a line.
struct LimitLine {
    /// What the line is, in words.
    title: &'static str,
    /// The limit's own name (the loop that measured it).
    name: String,
    value: f64,
    color: RGBColor,
}

/// What the picture shows, before any layout.
struct Chart<'a> {
    title: String,
    notes: Vec<String>,
    groups: Vec<Group>,
    bars: Vec<Bar<'a>>,
    limits: Vec<LimitLine>,
    /// Right end of the last slot.
    slots: f64,
    y_max: f64,
}

/// A finite, non-negative figure (0 otherwise).
fn clean(v: f64) -> f64 {
    if v.is_finite() { v.max(0.0) } else { 0.0 }
}

fn group_name(row: &Row) -> String {
    let temperature = row.temperature.trim();
    if temperature.is_empty() || temperature == "-" {
        row.op.clone()
    } else {
        format!("{}-{}", row.op, temperature)
    }
}

fn limit_value(limit: &Limit) -> Option<f64> {
    limit.gib_per_s().filter(|v| v.is_finite() && *v >= 0.0)
}

impl<'a> Chart<'a> {
    fn new(report: &'a BenchReport) -> Self {
        let size = crate::units::format_bytes(report.size);
        let roots = if report.roots.is_empty() {
            "no roots".to_string()
        } else {
            report.roots.join(", ")
        };
        let title = format!("memferry bench: {size} on {roots}");

        // Groups in order of first appearance, bars grouped (stable order).
        let mut groups: Vec<Group> = Vec::new();
        let mut others = 0;
        let mut measured: Vec<(usize, &'a Row, f64, f64, f64)> = Vec::new();
        for row in &report.rows {
            let Some(m) = &row.result else { continue };
            let name = group_name(row);
            let group = match groups.iter().position(|g| g.name == name) {
                Some(i) => i,
                None => {
                    let color = GROUP_COLORS
                        .iter()
                        .find(|(n, _)| *n == name)
                        .map(|(_, c)| *c)
                        .unwrap_or_else(|| {
                            others += 1;
                            OTHER_COLORS[(others - 1) % OTHER_COLORS.len()]
                        });
                    groups.push(Group { name, color });
                    groups.len() - 1
                }
            };
            let median = clean(m.median);
            let min = clean(m.min).min(median);
            let max = clean(m.max).max(median);
            measured.push((group, row, median, min, max));
        }
        measured.sort_by_key(|(group, ..)| *group);

        // The best row of each group: the one flagged by the sweep, or the
        // fastest when none is.
        let mut best = vec![false; measured.len()];
        for g in 0..groups.len() {
            let members = || measured.iter().enumerate().filter(|(_, m)| m.0 == g);
            let flagged: Vec<usize> = members()
                .filter(|(_, m)| m.1.best)
                .map(|(i, _)| i)
                .collect();
            if flagged.is_empty() {
                if let Some((i, _)) = members().max_by(|a, b| a.1.2.total_cmp(&b.1.2)) {
                    best[i] = true;
                }
            } else {
                for i in flagged {
                    best[i] = true;
                }
            }
        }

        let mut bars = Vec::with_capacity(measured.len());
        let mut cursor = 0.0;
        for (i, (group, row, median, min, max)) in measured.into_iter().enumerate() {
            if i > 0 && bars.last().is_some_and(|b: &Bar<'_>| b.group != group) {
                cursor += GROUP_GAP;
            }
            bars.push(Bar {
                label: &row.label,
                group,
                x: cursor + 0.5,
                median,
                min,
                max,
                best: best[i],
            });
            cursor += 1.0;
        }

        let tallest_bar = bars.iter().map(|b| b.max).fold(0.0, f64::max);
        let mut notes = Vec::new();
        let runs = if report.runs == 1 {
            "1 run".to_string()
        } else {
            format!("{} runs", report.runs)
        };
        notes.push(format!("median of {runs}; whiskers = min..max"));

        let limits_ = &report.limits;
        let mut limits = Vec::new();
        for (limit, title, color) in [
            (&limits_.odirect_read, "O_DIRECT read", ODIRECT_READ_COLOR),
            (
                &limits_.odirect_write,
                "O_DIRECT write",
                ODIRECT_WRITE_COLOR,
            ),
            (&limits_.buffered_read, "cached read", BUFFERED_READ_COLOR),
        ] {
            if let Some(value) = limit_value(limit) {
                limits.push(LimitLine {
                    title,
                    name: limit.name.clone(),
                    value,
                    color,
                });
            }
        }
        if let Some(value) = limit_value(&limits_.memcpy).filter(|_| !bars.is_empty()) {
            if value <= MEMCPY_RATIO * tallest_bar {
                limits.push(LimitLine {
                    title: "memcpy",
                    name: limits_.memcpy.name.clone(),
                    value,
                    color: MEMCPY_COLOR,
                });
            } else {
                let name = &limits_.memcpy.name;
                let name = if name.is_empty() || name == "memcpy" {
                    String::new()
                } else {
                    format!(" ({name})")
                };
                notes.push(format!(
                    "memcpy: {value:.2} GiB/s{name}, off the scale (not drawn)"
                ));
            }
        }

        let unavailable = report.rows.iter().filter(|r| r.result.is_none()).count();
        if unavailable > 0 {
            notes.push(format!(
                "{unavailable} setting{} unavailable (not drawn; see the table)",
                if unavailable == 1 { "" } else { "s" }
            ));
        }
        if let Some(note) = report.cold_note.as_ref().filter(|_| !report.cold_available) {
            notes.push(format!("cold restores unavailable: {note}"));
        }

        let tallest_limit = limits.iter().map(|l| l.value).fold(0.0, f64::max);
        let mut y_max = HEADROOM * tallest_bar.max(tallest_limit);
        if !(y_max.is_finite() && y_max > 0.0) {
            y_max = 1.0;
        }

        Chart {
            title,
            notes,
            groups,
            bars,
            limits,
            slots: cursor,
            y_max,
        }
    }
}

/// A text style whose SVG `font-size` is `px` (plotters writes size / 1.24).
fn font(px: f64) -> TextStyle<'static> {
    TextStyle::from(("sans-serif", px * 1.24).into_font()).color(&BLACK)
}

fn bold(px: f64) -> TextStyle<'static> {
    TextStyle::from(("sans-serif", px * 1.24, FontStyle::Bold).into_font()).color(&BLACK)
}

/// A generous estimate of the width of `text` at `px`, in pixels.
fn text_width(text: &str, px: f64) -> f64 {
    text.chars().count() as f64 * px * 0.6
}

/// The same for bold text.
fn bold_width(text: &str, px: f64) -> f64 {
    text_width(text, px) * 1.12
}

/// The two lines labelling a limit: what it is and its value, then the
/// loop that measured it.
fn limit_label(l: &LimitLine) -> (String, String) {
    (format!("{}: {:.2} GiB/s", l.title, l.value), l.name.clone())
}

/// Splits `text` at spaces into lines of at most `width` pixels at `px`.
fn wrap(text: &str, px: f64, width: f64) -> Vec<String> {
    let mut lines = Vec::new();
    let mut line = String::new();
    for word in text.split(' ') {
        if !line.is_empty() && text_width(&format!("{line} {word}"), px) > width {
            lines.push(std::mem::take(&mut line));
        }
        if !line.is_empty() {
            line.push(' ');
        }
        line.push_str(word);
    }
    lines.push(line);
    lines
}

enum Mark {
    Swatch(RGBColor),
    Star,
}

struct LegendEntry {
    mark: Mark,
    text: String,
    /// Top-left corner.
    at: (i32, i32),
}

const TITLE_PX: f64 = 20.0;
const NOTE_PX: f64 = 13.0;
const LEGEND_PX: f64 = 13.0;
const LABEL_PX: f64 = 12.0;
const VALUE_PX: f64 = 11.0;
const LIMIT_PX: f64 = 12.0;
const LIMIT_NAME_PX: f64 = 10.5;
/// Height of one limit label (two lines).
const LIMIT_LABEL_H: i32 = 30;
const LEGEND_MARK_W: i32 = 26;
const LEGEND_ROW_H: i32 = 22;

/// Pixel positions of everything outside the data area.
struct Layout {
    width: u32,
    height: u32,
    /// Top of the title.
    title_y: i32,
    /// Caption lines and the top of each.
    notes: Vec<(String, i32)>,
    legend: Vec<LegendEntry>,
    /// Bottom of the header: the plot starts here.
    header: u32,
    /// Height of the rotated x labels.
    x_labels: u32,
    /// Visible x range, in slots.
    x_range: (f64, f64),
    /// Width of the column right of the data area holding the limit labels.
    limit_labels: u32,
}

impl Layout {
    fn new(chart: &Chart<'_>) -> Self {
        let slots = chart.slots.max(1.0);
        let natural = slots * SLOT_PX;
        let limit_labels = chart
            .limits
            .iter()
            .map(|l| {
                let (head, name) = limit_label(l);
                bold_width(&head, LIMIT_PX).max(text_width(&name, LIMIT_NAME_PX))
            })
            .fold(0.0, f64::max);
        let limit_labels = if limit_labels > 0.0 {
            (limit_labels.ceil() as u32 + 24).min(360)
        } else {
            MARGIN
        };
        let room = f64::from(MIN_WIDTH - Y_LABEL_AREA - 2 * MARGIN - limit_labels);
        let (data_px, slot_px) = if natural >= room {
            (natural, SLOT_PX)
        } else {
            (room, (room / slots).min(MAX_SLOT_PX))
        };
        let visible = data_px / slot_px;
        let pad = (visible - chart.slots) / 2.0;
        let x_range = (-pad, chart.slots + pad);
        let width =
            (data_px.ceil() as u32 + Y_LABEL_AREA + 2 * MARGIN + limit_labels).max(MIN_WIDTH);
        let inner = f64::from(width - 2 * MARGIN);

        let title_y = 14;
        let mut y = title_y + 32;
        let mut notes = Vec::new();
        for note in &chart.notes {
            for line in wrap(note, NOTE_PX, inner) {
                notes.push((line, y));
                y += 19;
            }
        }

        let mut marks: Vec<(Mark, String)> = Vec::new();
        if !chart.bars.is_empty() {
            for g in &chart.groups {
                marks.push((Mark::Swatch(g.color), g.name.clone()));
            }
            marks.push((Mark::Star, "best of its group".to_string()));
        }
        let mut legend = Vec::new();
        if !marks.is_empty() {
            y += 8;
            let mut x = MARGIN as i32;
            for (mark, text) in marks {
                let w = LEGEND_MARK_W + 6 + text_width(&text, LEGEND_PX).ceil() as i32 + 18;
                if x > MARGIN as i32 && x + w > (width - MARGIN) as i32 {
                    x = MARGIN as i32;
                    y += LEGEND_ROW_H;
                }
                legend.push(LegendEntry {
                    mark,
                    text,
                    at: (x, y),
                });
                x += w;
            }
            y += LEGEND_ROW_H;
        }
        let header = (y + 6) as u32;

        let longest = chart
            .bars
            .iter()
            .map(|b| bold_width(b.label, LABEL_PX))
            .fold(0.0, f64::max);
        let x_labels = (longest.ceil() as u32 + 16).clamp(40, 320);
        let height = if chart.bars.is_empty() {
            header + 160
        } else {
            header + 10 + PLOT_HEIGHT + x_labels + MARGIN / 2
        };

        Layout {
            width,
            height,
            title_y,
            notes,
            legend,
            header,
            x_labels,
            x_range,
            limit_labels,
        }
    }
}

fn text(area: &Area<'_>, s: &str, at: (i32, i32), style: &TextStyle<'_>) -> Result<()> {
    area.draw_text(s, style, at).map_err(draw_err)
}

/// A five-pointed star centred on `c`.
fn star(area: &Area<'_>, c: (i32, i32), r: f64) -> Result<()> {
    let points: Vec<(i32, i32)> = (0..10)
        .map(|k| {
            let angle = (-90.0 + 36.0 * f64::from(k)).to_radians();
            let radius = if k % 2 == 0 { r } else { r * 0.45 };
            (
                c.0 + (radius * angle.cos()).round() as i32,
                c.1 + (radius * angle.sin()).round() as i32,
            )
        })
        .collect();
    let mut outline = points.clone();
    outline.push(points[0]);
    area.draw(&Polygon::new(points, STAR_FILL.filled()))
        .map_err(draw_err)?;
    area.draw(&PathElement::new(outline, STAR_EDGE.stroke_width(1)))
        .map_err(draw_err)
}

/// A horizontal dashed line from `x0` to `x1` at `y`.
fn dashed(area: &Area<'_>, x0: i32, x1: i32, y: i32, color: RGBColor) -> Result<()> {
    let mut x = x0;
    while x < x1 {
        let end = (x + 9).min(x1);
        area.draw(&PathElement::new(
            vec![(x, y), (end, y)],
            color.stroke_width(2),
        ))
        .map_err(draw_err)?;
        x += 14;
    }
    Ok(())
}

fn draw_header(root: &Area<'_>, chart: &Chart<'_>, layout: &Layout) -> Result<()> {
    let center = (layout.width / 2) as i32;
    let top = Pos::new(HPos::Center, VPos::Top);
    text(
        root,
        &chart.title,
        (center, layout.title_y),
        &bold(TITLE_PX).pos(top),
    )?;
    for (line, y) in &layout.notes {
        text(
            root,
            line,
            (center, *y),
            &font(NOTE_PX).color(&TEXT_GREY).pos(top),
        )?;
    }
    let left = Pos::new(HPos::Left, VPos::Center);
    for entry in &layout.legend {
        let (x, y) = entry.at;
        let mid = y + LEGEND_ROW_H / 2;
        match entry.mark {
            Mark::Swatch(color) => {
                root.draw(&Rectangle::new(
                    [(x + 6, mid - 7), (x + 20, mid + 7)],
                    color.filled(),
                ))
                .map_err(draw_err)?;
            }
            Mark::Star => star(root, (x + 13, mid), 8.0)?,
        }
        text(
            root,
            &entry.text,
            (x + LEGEND_MARK_W + 6, mid),
            &font(LEGEND_PX).pos(left),
        )?;
    }
    Ok(())
}

fn draw_empty(root: &Area<'_>, layout: &Layout) -> Result<()> {
    let center = Pos::new(HPos::Center, VPos::Center);
    text(
        root,
        "no measurements",
        ((layout.width / 2) as i32, (layout.header + 60) as i32),
        &bold(24.0).color(&TEXT_GREY).pos(center),
    )?;
    text(
        root,
        "no setting could be measured; see the table for why",
        ((layout.width / 2) as i32, (layout.header + 100) as i32),
        &font(NOTE_PX).color(&TEXT_GREY).pos(center),
    )
}

fn draw_plot(root: &Area<'_>, chart: &Chart<'_>, layout: &Layout) -> Result<()> {
    let (_, lower) = root.split_vertically(layout.header);
    let (x_lo, x_hi) = layout.x_range;
    let mut plot = ChartBuilder::on(&lower)
        .margin_top(10)
        .margin_left(MARGIN)
        .margin_right(layout.limit_labels)
        .margin_bottom(MARGIN / 2)
        .x_label_area_size(layout.x_labels)
        .y_label_area_size(Y_LABEL_AREA)
        .build_cartesian_2d(x_lo..x_hi, 0f64..chart.y_max)
        .map_err(draw_err)?;

    let decimals = if chart.y_max < 2.0 {
        2
    } else if chart.y_max < 20.0 {
        1
    } else {
        0
    };
    let y_format = |v: &f64| format!("{v:.decimals$}");
    plot.configure_mesh()
        .disable_x_mesh()
        .x_labels(0)
        .y_labels(10)
        .y_desc("GiB/s")
        .y_label_formatter(&y_format)
        .label_style(font(LABEL_PX))
        .axis_desc_style(font(14.0))
        .bold_line_style(RGBColor(215, 215, 215))
        .light_line_style(TRANSPARENT)
        .draw()
        .map_err(draw_err)?;

    let half = BAR_WIDTH / 2.0;
    plot.draw_series(chart.bars.iter().map(|b| {
        Rectangle::new(
            [(b.x - half, 0.0), (b.x + half, b.median)],
            chart.groups[b.group].color.filled(),
        )
    }))
    .map_err(draw_err)?;
    plot.draw_series(chart.bars.iter().filter(|b| b.best).map(|b| {
        Rectangle::new(
            [(b.x - half, 0.0), (b.x + half, b.median)],
            BLACK.stroke_width(2),
        )
    }))
    .map_err(draw_err)?;
    let cap = half / 3.0;
    let whisker = RGBColor(30, 30, 30).stroke_width(1);
    for b in &chart.bars {
        for points in [
            vec![(b.x, b.min), (b.x, b.max)],
            vec![(b.x - cap, b.min), (b.x + cap, b.min)],
            vec![(b.x - cap, b.max), (b.x + cap, b.max)],
        ] {
            plot.draw_series(std::iter::once(PathElement::new(points, whisker)))
                .map_err(draw_err)?;
        }
    }

    // Everything else in pixels, on the root area.
    let (left, bottom) = plot.backend_coord(&(x_lo, 0.0));
    let (right, _) = plot.backend_coord(&(x_hi, 0.0));
    let slot_px = f64::from(right - left) / (x_hi - x_lo);
    for l in &chart.limits {
        let (_, y) = plot.backend_coord(&(x_lo, l.value));
        dashed(root, left, right, y, l.color)?;
    }

    let decimals = if chart.y_max < 10.0 { 2 } else { 1 };
    for b in &chart.bars {
        let (x, top) = plot.backend_coord(&(b.x, b.max));
        let mut above = top - 3;
        if slot_px >= 34.0 {
            // On a light backdrop, so that a limit line crossing it does
            // not strike it out.
            let value = format!("{:.decimals$}", b.median);
            let half_w = (text_width(&value, VALUE_PX) / 2.0).ceil() as i32 + 1;
            root.draw(&Rectangle::new(
                [
                    (x - half_w, above - VALUE_PX as i32 - 1),
                    (x + half_w, above),
                ],
                WHITE.mix(0.85).filled(),
            ))
            .map_err(draw_err)?;
            text(
                root,
                &value,
                (x, above),
                &font(VALUE_PX)
                    .color(&TEXT_GREY)
                    .pos(Pos::new(HPos::Center, VPos::Bottom)),
            )?;
            above -= VALUE_PX as i32 + 2;
        }
        if b.best {
            star(root, (x, above - 8), 8.0)?;
        }
        let style = if b.best {
            bold(LABEL_PX)
        } else {
            font(LABEL_PX)
        };
        text(
            root,
            b.label,
            (x, bottom + 8),
            &style
                .transform(FontTransform::Rotate270)
                .pos(Pos::new(HPos::Right, VPos::Center)),
        )?;
    }

    // Limit labels in the column right of the data area, level with their
    // line, moved down where they would overlap the one above (and back up
    // where that runs past the axis).
    let (_, top) = plot.backend_coord(&(x_lo, chart.y_max));
    let mut labels: Vec<(i32, &LimitLine)> = chart
        .limits
        .iter()
        .map(|l| (plot.backend_coord(&(x_lo, l.value)).1, l))
        .collect();
    labels.sort_by_key(|(y, _)| *y);
    let mut placed: Vec<i32> = Vec::with_capacity(labels.len());
    for (y, _) in &labels {
        let lowest = placed.last().map_or(top + 8, |p| p + LIMIT_LABEL_H);
        placed.push((y - 6).max(lowest));
    }
    let mut ceiling = bottom - LIMIT_LABEL_H;
    for p in placed.iter_mut().rev() {
        *p = (*p).min(ceiling);
        ceiling = *p - LIMIT_LABEL_H;
    }
    let left_mid = Pos::new(HPos::Left, VPos::Center);
    for ((y, l), at) in labels.into_iter().zip(placed) {
        let (head, name) = limit_label(l);
        root.draw(&PathElement::new(
            vec![(right, y), (right + 4, y), (right + 8, at)],
            l.color.stroke_width(1),
        ))
        .map_err(draw_err)?;
        text(
            root,
            &head,
            (right + 10, at),
            &bold(LIMIT_PX).color(&l.color).pos(left_mid),
        )?;
        text(
            root,
            &name,
            (right + 10, at + 14),
            &font(LIMIT_NAME_PX).color(&l.color).pos(left_mid),
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::{Limits, Measurement, Setting};
    use crate::transfer::BackendKind;

    const MIB: u64 = 1 << 20;

    fn measured(median: f64) -> Option<Measurement> {
        Measurement::from_runs(vec![median * 0.96, median, median * 1.03])
    }

    fn limit(name: &str, value: Option<f64>) -> Limit {
        Limit {
            name: name.to_string(),
            result: value.and_then(measured),
            unavailable: value
                .is_none()
                .then(|| "not measured in this test".to_string()),
        }
    }

    fn setting(backend: BackendKind, n: usize, chunk_size: u64) -> Setting {
        let (workers, queue_depth) = match backend {
            BackendKind::Buffered => (n, 1),
            _ => (1, n),
        };
        Setting {
            backend,
            workers,
            queue_depth,
            chunk_size,
        }
    }

    fn row(op: &str, temperature: &str, setting: Setting, median: Option<f64>) -> Row {
        Row {
            op: op.to_string(),
            temperature: temperature.to_string(),
            label: setting.label(),
            setting,
            result: median.and_then(measured),
            unavailable: median.is_none().then(|| "EINVAL from O_DIRECT".to_string()),
            mode: "direct".to_string(),
            fallbacks: Vec::new(),
            limit: "odirect-read".to_string(),
            limit_gib_per_s: None,
            percent_of_limit: None,
            best: false,
        }
    }

    /// 15 measured rows (5 settings x restore-cold, restore-warm, save) and
    /// one unavailable row; the fastest of each group flagged best.
    fn report() -> BenchReport {
        let settings = [
            setting(BackendKind::Buffered, 4, 4 * MIB),
            setting(BackendKind::Buffered, 8, 16 * MIB),
            setting(BackendKind::Direct, 8, MIB),
            setting(BackendKind::Direct, 16, 4 * MIB),
            setting(BackendKind::Direct, 32, 4 * MIB),
        ];
        let groups: [(&str, &str, [f64; 5]); 3] = [
            ("restore", "cold", [2.1, 2.6, 4.4, 6.1, 6.3]),
            ("restore", "warm", [9.8, 11.2, 5.0, 6.4, 6.6]),
            ("save", "-", [1.9, 2.3, 3.5, 4.6, 4.4]),
        ];
        let mut rows = Vec::new();
        for (op, temperature, medians) in groups {
            let best = medians
                .iter()
                .enumerate()
                .max_by(|a, b| a.1.total_cmp(b.1))
                .map(|(i, _)| i);
            for (i, (s, m)) in settings.iter().zip(medians).enumerate() {
                let mut r = row(op, temperature, s.clone(), Some(m));
                r.best = Some(i) == best;
                rows.push(r);
            }
        }
        rows.push(row(
            "save",
            "-",
            setting(BackendKind::Direct, 64, 64 * MIB),
            None,
        ));
        BenchReport {
            op: "bench".to_string(),
            size: 8 << 30,
            roots: vec![
                "/mnt/nvme0/bench".to_string(),
                "/mnt/nvme1/bench".to_string(),
            ],
            runs: 5,
            cold_available: true,
            cold_note: None,
            limits: Limits {
                odirect_read: limit("odirect-read io_uring qd=32 bs=4MiB", Some(6.8)),
                odirect_write: limit("odirect-write io_uring qd=32 bs=4MiB", Some(5.1)),
                pread_direct: limit("pread-direct qd=1 bs=4MiB", Some(2.4)),
                buffered_read: limit("buffered-read cached w=8", Some(12.4)),
                memcpy: limit("memcpy 1 thread", Some(24.0)),
                pinned_h2d: None,
                pinned_d2h: None,
            },
            rows,
            best_restore: None,
            seconds: 42.0,
        }
    }

    fn write(report: &BenchReport) -> String {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bench.svg");
        write_svg(report, &path).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        // Only the chart is left: the temporary file was renamed.
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![OsString::from("bench.svg")]);
        let start = svg.trim_start();
        let start = match start.strip_prefix("<?xml") {
            Some(rest) => &rest[rest.find("?>").unwrap() + 2..],
            None => start,
        };
        assert!(start.trim_start().starts_with("<svg"), "{svg}");
        assert!(svg.trim_end().ends_with("</svg>"), "{svg}");
        assert_eq!(svg.matches("<svg").count(), 1);
        assert_eq!(svg.matches("<text").count(), svg.matches("</text>").count());
        svg
    }

    #[test]
    fn chart_shows_rows_limits_and_title() {
        let mut report = report();
        report.limits.buffered_read = limit("buffered-read cached w=8", None);
        let svg = write(&report);
        if let Some(sample) = std::env::var_os("MEMFERRY_PLOT_SAMPLE") {
            std::fs::write(sample, &svg).unwrap();
        }

        assert!(
            svg.contains("memferry bench: 8.00 GiB on /mnt/nvme0/bench, /mnt/nvme1/bench"),
            "{svg}"
        );
        assert!(svg.contains("GiB/s"));
        assert!(svg.contains("median of 5 runs; whiskers = min..max"));
        for r in report.rows.iter().filter(|r| r.result.is_some()) {
            assert!(svg.contains(&format!(">\n{}\n<", r.label)), "{}", r.label);
        }
        let unavailable = report.rows.iter().find(|r| r.result.is_none()).unwrap();
        assert!(!svg.contains(&unavailable.label), "{}", unavailable.label);
        assert!(svg.contains("1 setting unavailable"));

        let has_text = |t: &str| svg.contains(&format!(">\n{t}\n<"));
        assert!(has_text("O_DIRECT read: 6.80 GiB/s"));
        assert!(has_text("odirect-read io_uring qd=32 bs=4MiB"));
        assert!(has_text("O_DIRECT write: 5.10 GiB/s"));
        assert!(has_text("odirect-write io_uring qd=32 bs=4MiB"));
        // Not measured: not drawn.
        assert!(!svg.contains("buffered-read cached"));
        assert!(!svg.contains("cached read"));
        // Within 3x of the fastest bar (11.2 x 1.03): drawn as a line.
        assert!(has_text("memcpy: 24.00 GiB/s"));
        assert!(has_text("memcpy 1 thread"));
        // Only the three limits of the brief and memcpy: never pread.
        assert!(!svg.contains("pread-direct"));

        // One colour per group, the legend naming each group.
        for (name, color) in GROUP_COLORS {
            let (r, g, b) = color.rgb();
            let fill = format!("fill=\"#{r:02X}{g:02X}{b:02X}\"");
            // 5 bars + the legend swatch.
            assert_eq!(svg.matches(&fill).count(), 6, "{name}: {fill}");
            assert!(svg.contains(&format!(">\n{name}\n<")), "{name}");
        }
        assert!(svg.contains("best of its group"));
        // The best rows' labels are bold: one per group.
        let bold_labels = svg
            .matches("font-weight=\"bold\" transform=\"rotate(270")
            .count();
        assert_eq!(bold_labels, 3);
    }

    #[test]
    fn y_range_covers_the_tallest_whisker_and_limit() {
        let close = |chart: &Chart<'_>, want: f64| {
            assert!(
                (chart.y_max - want * HEADROOM).abs() < 1e-9,
                "{}",
                chart.y_max
            );
        };
        let mut report = report();
        // memcpy drawn: it is the tallest.
        close(&Chart::new(&report), 24.0);
        // memcpy off the scale: the buffered-read limit is the tallest.
        report.limits.memcpy = limit("memcpy 1 thread", Some(80.0));
        let chart = Chart::new(&report);
        close(&chart, 12.4);
        assert_eq!(chart.bars.len(), 15);
        assert_eq!(chart.limits.len(), 3);
        // Without it, the tallest whisker (11.2 x 1.03).
        report.limits.buffered_read = limit("buffered-read cached w=8", None);
        let chart = Chart::new(&report);
        close(&chart, 11.2 * 1.03);
        assert_eq!(chart.limits.len(), 2);
    }

    #[test]
    fn far_memcpy_is_only_mentioned() {
        let mut report = report();
        report.limits.memcpy = limit("memcpy 1 thread", Some(80.0));
        let svg = write(&report);
        assert!(svg.contains("memcpy: 80.00 GiB/s (memcpy 1 thread), off the scale (not drawn)"));
        assert!(!svg.contains(">\nmemcpy: 80.00 GiB/s\n<"));
        assert!(!svg.contains(">\nmemcpy 1 thread\n<"));
        assert!(svg.contains(">\ncached read: 12.40 GiB/s\n<"));
        assert!(svg.contains(">\nbuffered-read cached w=8\n<"));
    }

    #[test]
    fn best_is_the_fastest_when_none_is_flagged() {
        let mut report = report();
        for r in &mut report.rows {
            r.best = false;
        }
        let chart = Chart::new(&report);
        let best: Vec<&str> = chart
            .bars
            .iter()
            .filter(|b| b.best)
            .map(|b| b.label)
            .collect();
        assert_eq!(
            best,
            [
                "direct qd=32 chunk=4MiB",
                "buffered w=8 chunk=16MiB",
                "direct qd=16 chunk=4MiB"
            ]
        );
    }

    #[test]
    fn interleaved_rows_are_grouped() {
        let mut report = report();
        report.rows.reverse();
        let chart = Chart::new(&report);
        let groups: Vec<usize> = chart.bars.iter().map(|b| b.group).collect();
        let mut sorted = groups.clone();
        sorted.sort();
        assert_eq!(groups, sorted);
        assert_eq!(chart.groups[0].name, "save");
        assert!(chart.bars.windows(2).all(|w| w[0].x < w[1].x));
    }

    #[test]
    fn empty_report_says_no_measurements() {
        let mut report = report();
        report.rows.retain(|r| r.result.is_none());
        report.cold_available = false;
        report.cold_note = Some("dropping the page cache needs root".to_string());
        let svg = write(&report);
        assert!(svg.contains("no measurements"));
        assert!(svg.contains("memferry bench: 8.00 GiB on"));
        assert!(svg.contains("cold restores unavailable: dropping the page cache needs root"));
        assert!(!svg.contains("direct qd=64"));
        // No bars, no legend, no limit lines.
        assert!(!svg.contains("best of its group"));
        assert!(!svg.contains("memcpy"));
        assert!(!svg.contains("O_DIRECT read"));
        for (_, color) in GROUP_COLORS {
            let (r, g, b) = color.rgb();
            assert!(!svg.contains(&format!("#{r:02X}{g:02X}{b:02X}")));
        }

        report.rows.clear();
        let svg = write(&report);
        assert!(svg.contains("no measurements"));
    }

    #[test]
    fn write_errors_name_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("missing").join("bench.svg");
        let err = write_svg(&report(), &path).unwrap_err();
        assert!(
            matches!(&err, Error::Io { context, .. } if context == &format!("writing {}", path.display())),
            "{err}"
        );
    }
}
