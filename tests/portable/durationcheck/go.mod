module kuiperplugins.test/durationcheck

go 1.19
