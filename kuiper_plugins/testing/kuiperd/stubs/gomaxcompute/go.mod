module sqlflow.org/gomaxcompute

go 1.19
