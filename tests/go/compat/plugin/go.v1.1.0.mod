module example.com/plugin

go 1.21

require example.com/dep v1.1.0

replace example.com/dep v1.1.0 => ../dep-v1.1.0
