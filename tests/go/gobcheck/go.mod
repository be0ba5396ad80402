module kuiper-plugins/tests/gobcheck

go 1.19
