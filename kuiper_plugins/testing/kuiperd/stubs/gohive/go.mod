module sqlflow.org/gohive

go 1.19
