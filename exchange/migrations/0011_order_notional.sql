-- An order's average price from the prices it traded at, not from its rounded trade values.
--
-- history.average_price divided the sum of the order's trade values by its filled quantity. Each
-- trade's value is rounded to the fen (price x quantity / 1000, half up), which on a 1 kg lot is
-- most of it: a 1 kg fill at 35.00 CNY/t is worth 0.04 CNY, and the order reported an average of
-- 40.00, above its own limit. `notional` is the sum of price_fen x qty_kg over the order's fills,
-- exact; numeric, because an order's may pass 2^63 (2^40 kg at 2^26 fen per tonne).
ALTER TABLE orders ADD COLUMN notional numeric NOT NULL DEFAULT 0;
UPDATE orders o SET notional = f.n
  FROM (SELECT order_id, sum(price_fen::numeric * qty_kg) AS n FROM fills GROUP BY order_id) f
 WHERE f.order_id = o.order_id;
