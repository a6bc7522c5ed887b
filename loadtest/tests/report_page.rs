//! The HTML report (`--report-file`) in a real browser: a short dm-cross run against a real
//! cluster is rendered, opened from disk in headless Chromium (through chromedriver, as the
//! server's `tests/browser.rs` does), and every chart must have drawn its points.
//!
//! Needs `/usr/bin/chromium` and `/usr/bin/chromedriver` (`scripts/setup --test` installs
//! them). The page and a screenshot are written under the system temp dir, or to
//! `WSBUS_SCREENSHOT_DIR` when set; never into the repository.

#[path = "../../tests/common/chromium.rs"]
mod chromium;
mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use fantoccini::{Client, Locator};
use serde_json::json;
use wsbus_loadtest::{Config, Scenario};

fn out_dir() -> PathBuf {
    let dir = std::env::var_os("WSBUS_SCREENSHOT_DIR").map_or_else(
        || std::env::temp_dir().join(format!("wsbus-report-page-{}", std::process::id())),
        PathBuf::from,
    );
    std::fs::create_dir_all(&dir).expect("output directory");
    dir
}

/// Count of `selector` matches and how many of them the browser laid out with a size.
async fn drawn(client: &Client, selector: &str) -> (u64, u64) {
    let v = client
        .execute(
            "const els = [...document.querySelectorAll(arguments[0])];
             return [els.length, els.filter(e => { const r = e.getBoundingClientRect();
                                                   return r.width > 0 && r.height > 0; }).length];",
            vec![json!(selector)],
        )
        .await
        .expect("script runs");
    let n = |i: usize| v[i].as_u64().expect("a count");
    (n(0), n(1))
}

#[test]
fn the_report_page_draws_every_chart() {
    for bin in [chromium::CHROMIUM, chromium::CHROMEDRIVER] {
        assert!(
            Path::new(bin).exists(),
            "{bin} is missing: {}",
            chromium::INSTALL
        );
    }
    let cluster = common::start_cluster();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let cfg = Config {
        nodes: cluster.nodes.clone(),
        users: 20,
        hatch_rate: 200.0,
        rate: Some(300.0),
        run_time: Duration::from_secs(3),
        deadline: Some(Duration::from_secs(60)),
        ..Config::default()
    };
    let report = rt
        .block_on(wsbus_loadtest::run(Scenario::DmCross, &cfg))
        .expect("run");
    assert!(report.ok, "{:?}", report.problems);
    let html = wsbus_loadtest::render_html(&report);
    assert!(
        !html.contains("http://") && !html.contains("https://") && !html.contains("<script"),
        "the page loads nothing from elsewhere"
    );
    let dir = out_dir();
    let page = dir.join("dm-cross.html");
    std::fs::write(&page, &html).expect("write the page");

    // What the page must show, from the report itself.
    let seconds_with_latency = report
        .timeline
        .iter()
        .filter(|s| s.p50_us.is_some())
        .count() as u64;
    assert!(
        seconds_with_latency >= 3,
        "3 s of sending fill at least 3 seconds: {:?}",
        report.timeline
    );
    let buckets = report
        .latency_histogram
        .iter()
        .filter(|b| b.count > 0)
        .count() as u64;
    let seconds = report.timeline.len() as u64;

    let driver = rt.block_on(chromium::ChromeDriver::start());
    let profile = dir.join("profile");
    rt.block_on(async {
        let client = driver.session(&profile, "1000,2400").await;
        let checked = async {
            client
                .goto(&format!("file://{}", page.display()))
                .await
                .expect("open the page");
            let title = client
                .find(Locator::Css("h1"))
                .await
                .expect("a heading")
                .text()
                .await
                .expect("its text");
            assert_eq!(title, "wsbus-loadtest: dm-cross (open-loop)");
            // p50, p99 and p99.9 for every second with deliveries.
            assert_eq!(
                drawn(&client, "#latency-over-time circle.pt").await,
                (3 * seconds_with_latency, 3 * seconds_with_latency)
            );
            assert_eq!(
                drawn(&client, "#latency-histogram rect.bar").await,
                (buckets, buckets)
            );
            // Sent and delivered, and the connections held, for every second of the run.
            assert_eq!(
                drawn(&client, "#rate-over-time circle.pt").await,
                (2 * seconds, 2 * seconds)
            );
            assert_eq!(
                drawn(&client, "#connections-over-time circle.pt").await,
                (seconds, seconds)
            );
            assert_eq!(
                drawn(&client, "#errors-over-time circle.pt").await.0,
                seconds
            );
            let no_errors = client
                .find(Locator::Css("#errors-by-kind"))
                .await
                .expect("errors by kind")
                .text()
                .await
                .expect("its text");
            assert!(no_errors.contains("No errors."), "{no_errors}");
            let params = client
                .find(Locator::Css("#parameters"))
                .await
                .expect("parameters")
                .text()
                .await
                .expect("its text");
            assert!(
                params.contains("300/s") && params.contains("CPU"),
                "{params}"
            );
            let png = client.screenshot().await.expect("screenshot");
            std::fs::write(dir.join("dm-cross.png"), png).expect("write the screenshot");
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        let outcome = tokio::time::timeout_at(deadline.into(), checked).await;
        let _ = tokio::time::timeout(Duration::from_secs(5), client.close()).await;
        outcome.expect("the page was checked within 60 s");
    });
    let _ = std::fs::remove_dir_all(&profile);
    eprintln!("report page and screenshot: {}", dir.display());
}
