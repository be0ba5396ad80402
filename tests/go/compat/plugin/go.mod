module example.com/plugin

go 1.21

require example.com/dep v1.0.0

replace example.com/dep => ../dep
