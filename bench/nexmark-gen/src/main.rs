//! `nexmark-gen EVENTS OUT.jsonl [bids|all]`: the first EVENTS Nexmark events, one JSON
//! object per line, `date_time` in epoch milliseconds.
//! - `bids` (default): the bids only: `auction, bidder, price, channel, url, date_time,
//!   extra`.
//! - `all`: every event in one flat shape, as Nexmark's Flink setup reads them:
//!   `event_type` (0 person, 1 auction, 2 bid), `date_time`, and the kind's own fields
//!   prefixed `p_`, `a_` or `b_`.
//!
//! The generator is built from an explicit config (fixed base time, 10,000 events per
//! second of event time), and the output is checked for repeats: a generator built with
//! its defaults in some ways yields one event over and over.

use std::collections::HashSet;
use std::io::{BufWriter, Write};

use nexmark::config::NexmarkConfig;
use nexmark::event::{Event, EventType};
use nexmark::EventGenerator;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (events, out, all) = match args.as_slice() {
        [_, e, o] => (e, o, false),
        [_, e, o, kind] if kind == "bids" => (e, o, false),
        [_, e, o, kind] if kind == "all" => (e, o, true),
        _ => {
            eprintln!("usage: nexmark-gen EVENTS OUT.jsonl [bids|all]");
            std::process::exit(2);
        }
    };
    let events: usize = events.parse().expect("EVENTS is a number");
    let config = NexmarkConfig {
        base_time: 1_700_000_000_000,
        first_rate: 10_000,
        next_rate: 10_000,
        ..Default::default()
    };
    let file = std::fs::File::create(out).expect("create the output file");
    let mut w = BufWriter::with_capacity(1 << 20, file);
    let mut seen = HashSet::new();
    let mut bids = 0usize;
    let generator = EventGenerator::new(config.clone());
    let (generator, take) = match all {
        true => (generator, events),
        // The filter skips the other kinds: about 46 in 50 events are bids.
        false => (generator.with_type_filter(EventType::Bid), events * 46 / 50),
    };
    for event in generator.take(take) {
        let line = match event {
            Event::Bid(b) => {
                seen.insert((b.auction, b.bidder, b.price, b.date_time));
                bids += 1;
                match all {
                    false => serde_json::json!({
                        "auction": b.auction, "bidder": b.bidder, "price": b.price,
                        "channel": b.channel, "url": b.url, "date_time": b.date_time,
                        "extra": b.extra,
                    }),
                    true => serde_json::json!({
                        "event_type": 2, "date_time": b.date_time,
                        "b_auction": b.auction, "b_bidder": b.bidder, "b_price": b.price,
                        "b_channel": b.channel, "b_url": b.url, "b_extra": b.extra,
                    }),
                }
            }
            Event::Person(p) => serde_json::json!({
                "event_type": 0, "date_time": p.date_time,
                "p_id": p.id, "p_name": p.name, "p_email_address": p.email_address,
                "p_credit_card": p.credit_card, "p_city": p.city, "p_state": p.state,
                "p_extra": p.extra,
            }),
            Event::Auction(a) => serde_json::json!({
                "event_type": 1, "date_time": a.date_time,
                "a_id": a.id, "a_item_name": a.item_name, "a_description": a.description,
                "a_initial_bid": a.initial_bid, "a_reserve": a.reserve, "a_expires": a.expires,
                "a_seller": a.seller, "a_category": a.category, "a_extra": a.extra,
            }),
        };
        serde_json::to_writer(&mut w, &line).unwrap();
        w.write_all(b"\n").unwrap();
    }
    w.flush().unwrap();
    assert!(
        seen.len() * 100 >= bids * 99,
        "the generator repeats itself: {} distinct of {bids}",
        seen.len()
    );
    eprintln!("{bids} bids ({} distinct) in {out}", seen.len());
}
