-- The reserved organisation that keeps mail for postmaster (RFC 5321 section
-- 4.5.1). Its slug is no valid slug, so `org add` cannot take it and no plus
-- address reaches it. Its id is 0, so the first organisation added is still 1.
INSERT INTO organization (id, slug, name, active, created_at)
VALUES (0, '_postmaster', 'postmaster (reserved)', TRUE, now())
ON CONFLICT (slug) DO NOTHING;
