//! `weir init` and `weir demo`: project scaffolds. The demo is a small retail business
//! with the dirt real exports have: duplicates, nulls, malformed lines, values that do not
//! parse, a compressed file and a late-arriving file. Its data is generated
//! deterministically so tests can assert exact results.

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::Path;

use weir_common::Error;

fn write(root: &Path, rel: &str, content: &[u8]) -> Result<(), Error> {
    let path = root.join(rel);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
    }
    std::fs::write(&path, content).map_err(|e| Error::io(format!("writing {}", path.display()), e))
}

/// `weir init DIR`: a minimal project with one pipeline and one model.
/// What a project produces locally: the lake and the state store.
const GITIGNORE: &str = "lake/\n.weir/\n";

pub fn write_init(dir: &Path) -> Result<(), Error> {
    if dir.join("weir.yaml").exists() {
        return Err(Error::user(format!(
            "`{}` already holds a project",
            dir.display()
        )));
    }
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "project".into());
    write(dir, "weir.yaml", format!("name: {name}\n# Lake root: a directory or an object-store URL.\nlake: lake\nvars: {{}}\n").as_bytes())?;
    write(dir, ".gitignore", GITIGNORE.as_bytes())?;
    write(
        dir,
        "pipelines/example.yaml",
        b"description: Load the example CSV files into raw.example.\nsource:\n  type: files\n  path: data/*.csv\n  schema:\n    - { name: id, type: bigint, nullable: false }\nsink:\n  table: raw.example\n  mode: append\n",
    )?;
    write(
        dir,
        "data/example.csv",
        b"id,name,amount\n1,first,10.5\n2,second,20\n",
    )?;
    write(
        dir,
        "models/example_summary.sql",
        b"{{ config(materialized='table') }}\nselect count(*) as rows, sum(amount) as total\nfrom {{ source('raw', 'example') }}\n",
    )?;
    Ok(())
}

/// Deterministic pseudo-random numbers (a linear congruential generator).
struct Lcg(u64);

impl Lcg {
    fn next(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) % n
    }
}

const FIRST: [&str; 10] = [
    "Ada", "Ben", "Chloe", "Dev", "Ema", "Finn", "Gia", "Hugo", "Iris", "Jon",
];
const LAST: [&str; 5] = ["Smith", "Okafor", "Müller", "Tanaka", "Rossi"];
const COUNTRIES: [&str; 5] = ["US", "DE", "JP", "IT", "NG"];
const CATEGORIES: [&str; 4] = ["books", "garden", "kitchen", "toys"];

/// Adds the optional PostgreSQL path to the demo in `dir`: a `warehouse` connection and a
/// pipeline publishing `marts.daily_revenue` into `analytics.daily_revenue` there. The URL
/// is kept out of the project: weir.yaml reads it from `WEIR_DEMO_PG_URL`.
pub fn add_postgres(dir: &Path) -> Result<(), Error> {
    let path = dir.join("weir.yaml");
    let text = std::fs::read_to_string(&path)
        .map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
    if !text.contains("\nconnections:") {
        let text = format!(
            "{text}connections:\n  warehouse:\n    type: postgres\n    url: ${{env:WEIR_DEMO_PG_URL}}\n"
        );
        write(dir, "weir.yaml", text.as_bytes())?;
    }
    write(
        dir,
        "pipelines/publish_daily_revenue.yaml",
        b"description: Publish daily revenue to the PostgreSQL warehouse (weir demo --postgres).\nsource:\n  type: lake\n  table: marts.daily_revenue\nsink:\n  type: postgres\n  connection: warehouse\n  table: analytics.daily_revenue\n  mode: overwrite\n",
    )
}

/// Writes the demo project into `dir` unless it already has one, with its lake at `lake`
/// (default: `lake` in the project). Returns whether it wrote.
pub fn write_demo(dir: &Path, lake: Option<&str>) -> Result<bool, Error> {
    if dir.join("weir.yaml").exists() {
        return Ok(false);
    }
    let project = match lake {
        Some(url) => DEMO_PROJECT.replacen("lake: lake\n", &format!("lake: {url}\n"), 1),
        None => DEMO_PROJECT.to_string(),
    };
    write(dir, "weir.yaml", project.as_bytes())?;
    write(dir, ".gitignore", GITIGNORE.as_bytes())?;
    for (rel, text) in DEMO_FILES {
        write(dir, rel, text.as_bytes())?;
    }
    let mut rng = Lcg(42);

    // 50 customers; #12 exported twice; #7 without email; #21 with a broken date; one
    // truncated line.
    let mut c = String::from("customer_id,name,email,country,signup_date,updated_at\n");
    for id in 1..=50u64 {
        let name = format!("{} {}", FIRST[(id % 10) as usize], LAST[(id % 5) as usize]);
        let email = if id == 7 {
            String::new()
        } else {
            format!("{}{id}@Example.com", FIRST[(id % 10) as usize])
        };
        let date = if id == 21 {
            "2023-02-30".to_string()
        } else {
            format!("2023-{:02}-{:02}", 1 + id % 12, 1 + id % 28)
        };
        let _ = writeln!(
            c,
            "{id},\"{name}\",{email},{},{date},{DAY_ONE_EXPORT}",
            COUNTRIES[(id % 5) as usize]
        );
        if id == 12 {
            let _ = writeln!(
                c,
                "{id},\"{name}\",{email},{},{date},{DAY_ONE_EXPORT}",
                COUNTRIES[(id % 5) as usize]
            );
        }
        if id == 30 {
            c.push_str("31,Kim Broken\n");
        }
    }
    write(dir, "data/customers.csv", c.as_bytes())?;

    // 20 products as NDJSON; one cut-off line, one price that is not a number.
    let mut p = String::new();
    for id in 1..=20u64 {
        let price = 5 + rng.next(95);
        let _ = writeln!(
            p,
            "{{\"product_id\": {id}, \"name\": \"Product {id}\", \"category\": \"{}\", \"price\": \"{price}.{:02}\"}}",
            CATEGORIES[(id % 4) as usize],
            rng.next(100)
        );
        if id == 10 {
            p.push_str("{\"product_id\": 99, \"name\": \"Broken\n");
        }
    }
    p.push_str("{\"product_id\": 21, \"name\": \"Mystery\", \"category\": \"toys\", \"price\": \"call us\"}\n");
    write(dir, "data/products.ndjson", p.as_bytes())?;

    // Orders over two days, plus a file for day one that arrived late; order 45 names its
    // customer as `N/A`; order 17 has a NULL status.
    let mut items = String::from("order_item_id,order_id,product_id,quantity,unit_price\n");
    let mut item_id = 0;
    let files: [(&str, std::ops::RangeInclusive<u64>, &str); 3] = [
        ("data/orders/orders_2024-01-01.csv", 1..=30, "2024-01-01"),
        ("data/orders/orders_2024-01-02.csv", 31..=60, "2024-01-02"),
        (
            "data/orders/orders_2024-01-01_late.csv",
            61..=65,
            "2024-01-01",
        ),
    ];
    for (rel, ids, day) in files {
        let mut o = String::from("order_id,customer_id,order_date,status\n");
        for id in ids {
            let customer = if id == 45 {
                "N/A".to_string()
            } else {
                (1 + rng.next(50)).to_string()
            };
            let customer = if customer == "21" {
                "22".to_string()
            } else {
                customer
            };
            let status = match id {
                17 => "NULL",
                _ if id % 10 == 0 => "returned",
                _ => "shipped",
            };
            let _ = writeln!(o, "{id},{customer},{day},{status}");
            for _ in 0..(1 + id % 3) {
                item_id += 1;
                let product = 1 + rng.next(20);
                let qty = if item_id == 50 {
                    "-".to_string()
                } else if item_id == 77 {
                    // Parses fine, but no order ships zero items: the range check
                    // quarantines it. (The draw keeps the other values as they were.)
                    let _ = rng.next(4);
                    "0".to_string()
                } else {
                    (1 + rng.next(4)).to_string()
                };
                let _ = writeln!(
                    items,
                    "{item_id},{id},{product},{qty},{}.{:02}",
                    5 + rng.next(95),
                    rng.next(100)
                );
            }
        }
        write(dir, rel, o.as_bytes())?;
    }
    let gz = gzip(&items)?;
    write(dir, "data/order_items.csv.gz", &gz)?;
    Ok(true)
}

fn gzip(text: &str) -> Result<Vec<u8>, Error> {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(text.as_bytes())
        .map_err(|e| Error::internal(format!("gzip: {e}")))?;
    gz.finish()
        .map_err(|e| Error::internal(format!("gzip: {e}")))
}

/// When the day-one customer export was taken.
const DAY_ONE_EXPORT: &str = "2023-12-31T18:00:00";

/// The second day of the demo: changed and new customers and products, and the orders of
/// 2024-01-03. Written when the demo runs again; returns false when it is already there.
pub fn write_day_two(dir: &Path) -> Result<bool, Error> {
    let orders = "data/orders/orders_2024-01-03.csv";
    if dir.join(orders).exists() {
        return Ok(false);
    }
    // Customer 3 moved to another country, 5 changed email, 51 is new.
    write(
        dir,
        "data/customers_2024-01-03.csv",
        b"customer_id,name,email,country,signup_date,updated_at\n\
3,\"Dev Tanaka\",Dev3@Example.com,FR,2023-04-04,2024-01-02T18:00:00\n\
5,\"Finn Smith\",finn.smith@example.com,US,2023-06-06,2024-01-02T18:00:00\n\
51,\"Gina Moreau\",gina51@example.com,ES,2024-01-02,2024-01-02T18:00:00\n",
    )?;
    // Product 3 got cheaper; product 22 is new.
    write(
        dir,
        "data/products_2024-01-03.ndjson",
        b"{\"product_id\": 3, \"name\": \"Product 3\", \"category\": \"toys\", \"price\": \"9.99\"}\n\
{\"product_id\": 22, \"name\": \"Product 22\", \"category\": \"toys\", \"price\": \"14.50\"}\n",
    )?;
    write(
        dir,
        orders,
        b"order_id,customer_id,order_date,status\n70,3,2024-01-03,shipped\n71,5,2024-01-03,shipped\n72,51,2024-01-03,shipped\n",
    )?;
    let items = "order_item_id,order_id,product_id,quantity,unit_price\n\
500,70,3,2,9.99\n501,71,22,1,14.50\n502,72,1,3,12.00\n";
    let gz = gzip(items)?;
    write(dir, "data/order_items_2024-01-03.csv.gz", &gz)?;
    Ok(true)
}

/// After a successful demo run: a few queries that show what was built.
pub async fn print_tour(project: &weir_config::Project, dir: &Path) -> Result<(), Error> {
    let lake = weir_lake::Lake::for_project(project);
    let ctx = weir_engine::lake_session(&lake).await?;
    let df = ctx
        .sql("select order_date, orders, items, revenue from marts.daily_revenue order by order_date")
        .await
        .map_err(|e| Error::internal(format!("demo tour: {e}")))?;
    let batches = df
        .collect()
        .await
        .map_err(|e| Error::internal(format!("demo tour: {e}")))?;
    let text = arrow::util::pretty::pretty_format_batches(&batches)
        .map_err(|e| Error::internal(e.to_string()))?;
    eprintln!("\nmarts.daily_revenue:\n{text}");
    let df = ctx
        .sql(
            "select customer_id, country, email, cast(valid_from as varchar) as valid_from, \
             cast(valid_to as varchar) as valid_to, is_current \
             from marts.dim_customer where customer_id in \
               (select customer_id from marts.dim_customer group by customer_id having count(*) > 1) \
             order by customer_id, version",
        )
        .await
        .map_err(|e| Error::internal(format!("demo tour: {e}")))?;
    let batches = df
        .collect()
        .await
        .map_err(|e| Error::internal(format!("demo tour: {e}")))?;
    if batches.iter().any(|b| b.num_rows() > 0) {
        let text = arrow::util::pretty::pretty_format_batches(&batches)
            .map_err(|e| Error::internal(e.to_string()))?;
        eprintln!("\ncustomers with history (marts.dim_customer, SCD type 2):\n{text}");
    }
    let d = dir.display();
    eprintln!(
        "\ntry next:\n  weir --project {d} tables\n  weir --project {d} query \"select reason, count(*) from raw.customers__quarantine group by reason\"\n  weir --project {d} table history raw.orders\n  weir --project {d} test         # the data quality checks\n  weir --project {d} run          # again: nothing new to load\n  weir demo {d}                   # again: a second day of changes arrives (customer history in marts.dim_customer)"
    );
    Ok(())
}

const DEMO_PROJECT: &str = "name: retail_demo
lake: lake
vars:
  returned_status: returned
retry:
  max_attempts: 3
  initial_backoff: 200ms
  max_backoff: 5s
";

const DEMO_FILES: &[(&str, &str)] = &[
    (
        "pipelines/customers.yaml",
        "description: Customer master data exported nightly from the shop.
tags: [raw, crm]
source:
  type: files
  path: data/customers*.csv
  schema:
    - { name: customer_id, type: bigint, nullable: false }
    - { name: signup_date, type: date }
    - { name: updated_at, type: timestamp }
sink:
  table: raw.customers
  mode: append
max_bad_rows: 5%
",
    ),
    (
        "pipelines/products.yaml",
        "description: Product catalogue as newline-delimited JSON.
tags: [raw]
source:
  type: files
  path: data/products*.ndjson
  schema:
    - { name: product_id, type: bigint, nullable: false }
    - { name: price, type: 'decimal(10,2)' }
sink:
  table: raw.products
  mode: merge
  key: [product_id]
",
    ),
    (
        "pipelines/orders.yaml",
        "description: Daily order exports; late files for past days arrive now and then.
tags: [raw, sales]
source:
  type: files
  path: data/orders/*.csv
  csv:
    null_values: ['', 'NULL']
  schema:
    - { name: order_id, type: bigint, nullable: false }
    - { name: customer_id, type: bigint }
    - { name: order_date, type: date }
sink:
  table: raw.orders
  mode: append
  partition_by: [order_date]
checks:
  # Every order's customer should be in the customer table (two customer rows are
  # quarantined, so this warns rather than blocks).
  - { check: relationships, column: customer_id, to: raw.customers, field: customer_id, severity: warn }
  - { check: unique, column: order_id }
",
    ),
    (
        "pipelines/order_items.yaml",
        "description: Order lines, gzip-compressed.
tags: [raw, sales]
source:
  type: files
  path: data/order_items*.csv.gz
  schema:
    - { name: quantity, type: int }
    - { name: unit_price, type: 'decimal(10,2)' }
sink:
  table: raw.order_items
  mode: append
checks:
  # Implausible quantities go to raw.order_items__quarantine; the rest is published.
  - { check: range, column: quantity, min: 1, max: 100, on_fail: quarantine }
  - { check: not_null, column: order_id }
",
    ),
    (
        "models/staging/stg_customers.sql",
        "-- One row per customer, as of the latest export: exports repeat rows, emails come
-- in any case.
select customer_id, name, email, country, signup_date
from (
  select distinct customer_id, name, lower(email) as email, country, signup_date, updated_at,
         rank() over (partition by customer_id order by updated_at desc) as latest
  from {{ source('raw', 'customers') }}
)
where latest = 1
",
    ),
    (
        "models/staging/stg_orders.sql",
        "select order_id, customer_id, order_date, coalesce(status, 'unknown') as status,
       status = '{{ var(\"returned_status\") }}' as is_returned
from {{ source('raw', 'orders') }}
",
    ),
    (
        "models/staging/stg_order_items.sql",
        "{{ config(materialized='view') }}
select order_item_id, order_id, product_id, quantity, unit_price,
       cast(quantity * unit_price as decimal(12, 2)) as line_total
from {{ source('raw', 'order_items') }}
where quantity is not null
",
    ),
    (
        "models/marts/daily_revenue.sql",
        "-- Revenue per order day, returns excluded.
select o.order_date,
       count(distinct o.order_id) as orders,
       count(*) as items,
       sum(i.line_total) as revenue
from {{ ref('stg_orders') }} o
join {{ ref('stg_order_items') }} i on i.order_id = o.order_id
where not o.is_returned
group by o.order_date
",
    ),
    (
        "models/marts/customer_revenue.sql",
        "select c.customer_id, c.name, c.country,
       count(distinct o.order_id) as orders,
       coalesce(sum(i.line_total), 0) as revenue
from {{ ref('stg_customers') }} c
left join {{ ref('stg_orders') }} o on o.customer_id = c.customer_id and not o.is_returned
left join {{ ref('stg_order_items') }} i on i.order_id = o.order_id
group by c.customer_id, c.name, c.country
",
    ),
    (
        "models/marts/fct_orders.sql",
        "{{ config(materialized='incremental', unique_key='order_id') }}
select o.order_id, o.customer_id, o.order_date, o.status,
       count(i.order_item_id) as items,
       sum(i.line_total) as amount
from {{ ref('stg_orders') }} o
left join {{ ref('stg_order_items') }} i on i.order_id = o.order_id
{% if is_incremental() %}
where o.order_id > (select coalesce(max(order_id), 0) from {{ this }})
{% endif %}
group by o.order_id, o.customer_id, o.order_date, o.status
",
    ),
    (
        "models/marts/dim_customer.sql",
        "-- Customer history (SCD type 2): a new version whenever an export shows a change,
-- valid from the export's `updated_at`; facts look up the version valid on their date.
{{ config(materialized='scd2', unique_key='customer_id', change_ts='updated_at',
          surrogate_key='customer_sk', unknown_member=true) }}
select distinct customer_id, name, lower(email) as email, country, updated_at
from {{ source('raw', 'customers') }}
",
    ),
    (
        "models/marts/dim_product.sql",
        "-- Products (SCD type 1): changed attributes are overwritten in place.
{{ config(materialized='scd1', unique_key='product_id', surrogate_key='product_sk',
          unknown_member=true) }}
select product_id, name, category, price
from {{ source('raw', 'products') }}
",
    ),
    (
        "models/marts/dim_date.sql",
        "{{ date_dimension('2024-01-01', '2024-12-31') }}
",
    ),
    (
        "models/marts/fct_sales.sql",
        "-- One row per order line, keyed by surrogate keys: the customer as they were on the
-- order date (a point-in-time lookup), the product as it is now.
select i.order_item_id, i.order_id,
       coalesce(c.customer_sk, {{ unknown_key() }}) as customer_sk,
       coalesce(p.product_sk, {{ unknown_key() }}) as product_sk,
       d.date_key, i.quantity, i.unit_price, i.line_total
from {{ ref('stg_order_items') }} i
join {{ ref('stg_orders') }} o on o.order_id = i.order_id
left join {{ ref('dim_customer') }} c
  on c.customer_id = o.customer_id and {{ as_of('c', 'o.order_date') }}
left join {{ ref('dim_product') }} p on p.product_id = i.product_id
left join {{ ref('dim_date') }} d on d.date = o.order_date
",
    ),
    (
        "models/marts/marts.yaml",
        "models:
  - name: daily_revenue
    description: Revenue per order day, returns excluded.
    tags: [finance]
  - name: customer_revenue
    description: Lifetime revenue per customer.
    tags: [finance]
  - name: fct_orders
    description: One row per order with its item count and amount.
  - name: dim_customer
    description: Customers with their history (SCD type 2).
    tags: [star]
  - name: dim_product
    description: Products, current attributes (SCD type 1).
    tags: [star]
  - name: dim_date
    description: One row per day of 2024.
    tags: [star]
  - name: fct_sales
    description: Order lines keyed by the dimensions' surrogate keys.
    tags: [star]
",
    ),
];
