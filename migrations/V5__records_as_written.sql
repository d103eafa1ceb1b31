-- Records are kept exactly as the producer wrote them: header names are bytes too (a name need not
-- be UTF-8, and Postgres `text` cannot hold a NUL).
ALTER TABLE projector.held_events ADD COLUMN header_name_bytes bytea[] NOT NULL DEFAULT '{}';
UPDATE projector.held_events
   SET header_name_bytes = ARRAY(SELECT convert_to(name, 'UTF8') FROM unnest(header_names) WITH ORDINALITY AS h(name, n) ORDER BY n)
 WHERE cardinality(header_names) > 0;
ALTER TABLE projector.held_events DROP COLUMN header_names;
ALTER TABLE projector.held_events RENAME COLUMN header_name_bytes TO header_names;

ALTER TABLE projector.dead_letters ADD COLUMN header_name_bytes bytea[] NOT NULL DEFAULT '{}';
UPDATE projector.dead_letters
   SET header_name_bytes = ARRAY(SELECT convert_to(name, 'UTF8') FROM unnest(header_names) WITH ORDINALITY AS h(name, n) ORDER BY n)
 WHERE cardinality(header_names) > 0;
ALTER TABLE projector.dead_letters DROP COLUMN header_names;
ALTER TABLE projector.dead_letters RENAME COLUMN header_name_bytes TO header_names;
